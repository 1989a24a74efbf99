"""Weight files: round trip, presets, and clear errors on bad files."""

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from learnedopt import (
    CoordinateLSTM,
    LSTMOptimizer,
    MetaLSTMCell,
    MetaLSTMOptimizer,
    UntrainedWeightsWarning,
    load_weights,
    save_weights,
)
from learnedopt.weights import PRESETS, build_preset, read_header


def test_round_trip_keeps_architecture_and_values(tmp_path) -> None:
    rule = CoordinateLSTM(hidden_size=12, num_layers=3, momentum_decays=(0.9,), param_input=True)
    path = tmp_path / "rule.safetensors"
    save_weights(rule, path, trained_on="unit test", extra={"note": "x"})
    loaded, header = load_weights(path)
    assert isinstance(loaded, CoordinateLSTM) and loaded.config == rule.config
    assert header["trained_on"] == "unit test" and header["note"] == "x" and header["library_version"]
    for (k, v), (k2, v2) in zip(rule.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_file_saved_as_untrained_warns_and_is_not_averaged(tmp_path) -> None:
    from learnedopt.weights import average_weights

    path = tmp_path / "init.safetensors"
    save_weights(CoordinateLSTM(), path, trained=False)
    assert read_header(path)["trained"] is False
    with pytest.warns(UntrainedWeightsWarning, match="UNTRAINED"):
        LSTMOptimizer([torch.zeros(2, requires_grad=True)], weights=path)
    with pytest.raises(ValueError, match="init.safetensors: untrained weights"):
        average_weights([path])


def test_optimizer_accepts_path_preset_and_module(tmp_path, recwarn) -> None:
    rule = MetaLSTMCell()
    path = tmp_path / "meta.safetensors"
    save_weights(rule, path)
    p = [torch.zeros(3, requires_grad=True)]
    by_path = MetaLSTMOptimizer(p, weights=path)
    by_str = MetaLSTMOptimizer(p, weights=str(path))
    by_module = MetaLSTMOptimizer(p, weights=rule)
    for opt in (by_path, by_str, by_module):
        assert torch.equal(opt.rule.bias_fi, rule.bias_fi)
    assert not [w for w in recwarn if issubclass(w.category, UntrainedWeightsWarning)]


@pytest.mark.parametrize(
    ("cls", "preset"),
    [(LSTMOptimizer, "l2l-2016"), (MetaLSTMOptimizer, "meta-lstm-2017"), (MetaLSTMOptimizer, "meta-lstm-adam")],
)
def test_untrained_presets_warn_loudly(cls, preset) -> None:
    with pytest.warns(UntrainedWeightsWarning, match="UNTRAINED"):
        cls([torch.zeros(2, requires_grad=True)], weights=preset)
    if cls.default_preset == preset:
        with pytest.warns(UntrainedWeightsWarning, match="UNTRAINED"):
            cls([torch.zeros(2, requires_grad=True)])


def test_a_file_saved_untrained_warns_naming_the_file(tmp_path) -> None:
    """It said "(preset None):  It is not ..." for a file of one's own."""
    path = tmp_path / "mine.safetensors"
    save_weights(CoordinateLSTM(hidden_size=4), path, trained=False)
    with pytest.warns(UntrainedWeightsWarning) as caught:
        LSTMOptimizer([torch.zeros(2, requires_grad=True)], weights=path)
    message = str(caught[0].message)
    assert message.startswith(f"LSTMOptimizer is using UNTRAINED weights ({path}, saved with trained=False). It is not")
    assert "preset None" not in message


@pytest.mark.parametrize("preset", sorted(name for name, p in PRESETS.items() if p.file is not None))
def test_shipped_trained_presets_load_without_warning(preset, recwarn) -> None:
    from importlib import resources

    rule, header = build_preset(preset)
    assert rule.kind == PRESETS[preset].kind  # what `learnedopt presets` lists is the file's rule
    card = resources.files("learnedopt.pretrained") / PRESETS[preset].file.replace(".safetensors", ".md")
    assert card.is_file(), f"{preset} ships without its model card"
    assert header["trained"] is True and header["trained_on"] and header["preset"] == preset
    if "averaged_from" in header:  # an average of meta-trained presets: each member's command is recorded
        assert header["command"].startswith("learnedopt average-weights ")
        assert len(header["averaged_from"]) > 1
        assert all("learnedopt meta-train" in member["command"] for member in header["averaged_from"])
    else:
        assert "learnedopt meta-train" in header["command"]
    assert not [w for w in recwarn if issubclass(w.category, UntrainedWeightsWarning)]


def test_averaged_presets_are_the_mean_of_the_members_shipped_now() -> None:
    """The README calls l2l-blend the weight-wise mean of l2l-short and l2l-random: a member
    re-trained without re-averaging would leave that claim, and the header's record, false."""
    from learnedopt.weights import average_weights, fingerprint

    averaged = [n for n, p in PRESETS.items() if p.file is not None and "averaged_from" in build_preset(n)[1]]
    assert "l2l-blend" in averaged
    for name in averaged:
        members = [m["path"] for m in build_preset(name)[1]["averaged_from"]]
        assert all(m in PRESETS for m in members), members
        assert fingerprint(average_weights(members)[0]) == fingerprint(build_preset(name)[0]), name


@pytest.mark.parametrize("cls", [LSTMOptimizer, MetaLSTMOptimizer])
def test_defaults_are_trained_presets_and_load_silently(cls, recwarn) -> None:
    opt = cls([torch.zeros(2, requires_grad=True)])
    assert opt.weights_header["preset"] == cls.default_preset
    assert opt.weights_header["trained"] is True
    assert not [w for w in recwarn if issubclass(w.category, UntrainedWeightsWarning)]


@pytest.mark.parametrize("preset", sorted(name for name, p in PRESETS.items() if p.file is None))
def test_untrained_presets_are_deterministic(preset: str) -> None:
    a, _ = build_preset(preset)
    torch.manual_seed(1)  # the global generator must play no part
    b, _ = build_preset(preset)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_meta_lstm_adam_starts_at_the_gate_biases_its_description_states() -> None:
    description = PRESETS["meta-lstm-adam"].description
    stated = re.search(r"\(seed 0: (-?[\d.]+), (-?[\d.]+)\)", description)
    assert stated and "step of 0.026 and a weight decay of 6e-5" in description
    rule, _ = build_preset("meta-lstm-adam")
    forget, step = rule.bias_fi.tolist()
    assert (round(forget, 2), round(step, 2)) == (float(stated[1]), float(stated[2])) == (9.72, -3.62)
    assert round(torch.sigmoid(torch.tensor(step)).item(), 3) == 0.026
    assert f"{1 - torch.sigmoid(torch.tensor(forget, dtype=torch.float64)).item():.0e}" == "6e-05"


@pytest.mark.parametrize("cls", [LSTMOptimizer, MetaLSTMOptimizer])
def test_a_missing_safetensors_file_is_file_not_found_not_an_unknown_preset(cls, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="weight file not found: mine.safetensors"):
        cls([torch.zeros(2, requires_grad=True)], weights="mine.safetensors")
    with pytest.raises(ValueError, match="unknown preset 'mine' and no such file"):
        cls([torch.zeros(2, requires_grad=True)], weights="mine")


def test_wrong_architecture_file_is_rejected(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(CoordinateLSTM(), path)
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="runs a MetaLSTMCell update rule"):
        MetaLSTMOptimizer(p, weights=path)
    # header says hidden 20, tensors are hidden 8
    small = CoordinateLSTM(hidden_size=8)
    header = {"format": 1, "kind": "CoordinateLSTM", "config": CoordinateLSTM().config_dict(), "trained": True}
    save_file(dict(small.state_dict()), str(path), metadata={"learnedopt": json.dumps(header)})
    with pytest.raises(ValueError, match="do not match the CoordinateLSTM architecture"):
        LSTMOptimizer(p, weights=path)


def test_truncated_file_is_rejected(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(CoordinateLSTM(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_weights(path)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_weights(path)


def test_nan_weights_are_rejected(tmp_path) -> None:
    rule = CoordinateLSTM()
    header = {"format": 1, "kind": rule.kind, "config": rule.config_dict(), "trained": True}
    with torch.no_grad():
        rule.lstm.bias_ih_l1[3] = float("nan")
    path = tmp_path / "w.safetensors"  # written by hand: save_weights refuses NaN weights
    save_file(rule.state_dict(), str(path), metadata={"learnedopt": json.dumps(header)})
    with pytest.raises(ValueError, match=r"NaN or Inf \(in float32\) in \[.lstm.bias_ih_l1.\]"):
        load_weights(path)


def test_files_without_header_or_pickles_are_rejected_without_running_code(tmp_path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="no learnedopt header"):
        load_weights(plain)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle code ran')",))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_weights(evil)
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.safetensors")


def test_unknown_kind_and_format(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    for header, message in [
        ({"format": 1, "kind": "Transformer", "config": {}}, "unknown update rule kind"),
        ({"format": 99, "kind": "CoordinateLSTM", "config": {}}, "unsupported weight format"),
        ({"format": 1, "kind": "CoordinateLSTM"}, "no architecture config"),
        ({"format": 1, "kind": "CoordinateLSTM", "config": None}, "no architecture config"),
        ({"kind": "CoordinateLSTM", "config": {}}, "unsupported weight format None"),
        (["format", 1], "header is a JSON list, not an object"),
        ({"format": 1, "config": {}}, r"learnedopt header has no rule kind \(a 'kind' string\)"),
        ({"format": 1, "kind": 3, "config": {}}, r"learnedopt header has no rule kind \(a 'kind' string\)"),
    ]:
        save_file({"x": torch.zeros(1)}, str(path), metadata={"learnedopt": json.dumps(header)})
        with pytest.raises(ValueError, match=message):
            read_header(path)
        if "unknown update rule kind" not in message:  # what is wrong but the kind's class, also unregistered
            with pytest.raises(ValueError, match=message):
                read_header(path, registered=False)
    save_file({"x": torch.zeros(1)}, str(path), metadata={"learnedopt": '{"format": 1, "kind": '})
    with pytest.raises(ValueError, match="w.safetensors: learnedopt header is not valid JSON"):
        read_header(path)


def _trained_file(path, seed: int, **config) -> CoordinateLSTM:
    rule = CoordinateLSTM(**config)
    rule.reset_parameters(generator=torch.Generator().manual_seed(seed))
    save_weights(rule, path, trained_on=f"unit test {seed}", extra={"command": f"train --seed {seed}"})
    return rule


def test_average_weights_is_the_mean_and_records_its_members(tmp_path, capsys) -> None:
    from learnedopt.cli import main
    from learnedopt.weights import fingerprint

    rules = [_trained_file(tmp_path / f"r{s}.safetensors", s, hidden_size=6) for s in (1, 2, 3)]
    paths = [str(tmp_path / f"r{s}.safetensors") for s in (1, 2, 3)]
    out = tmp_path / "soup.safetensors"
    assert main(["average-weights", *paths, "--out", str(out)]) == 0
    soup, header = load_weights(out)
    for name, tensor in soup.state_dict().items():
        expected = sum(r.state_dict()[name].double() for r in rules) / 3
        torch.testing.assert_close(tensor, expected.float(), rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(soup.state_dict().values(), rules[0].state_dict().values()))
    assert [m["path"] for m in header["averaged_from"]] == paths
    assert [m["sha256"] for m in header["averaged_from"]] == [fingerprint(r)["sha256"] for r in rules]
    assert [m["command"] for m in header["averaged_from"]] == ["train --seed 1", "train --seed 2", "train --seed 3"]
    assert header["command"].startswith("learnedopt average-weights ") and header["trained"] is True
    assert "unit test 2" in header["trained_on"]
    # the order of the files does not change a bit; one file gives itself back
    assert main(["average-weights", *reversed(paths), "--out", str(tmp_path / "rev.safetensors")]) == 0
    reordered, _ = load_weights(tmp_path / "rev.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(soup.state_dict().values(), reordered.state_dict().values()))
    capsys.readouterr()
    assert main(["average-weights", paths[0], "--out", str(tmp_path / "one.safetensors")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'one.safetensors'}: a copy of the one weight file given\n"  # not "of 1 weight files"
    one, _ = load_weights(tmp_path / "one.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), rules[0].state_dict().values()))
    # the averaged file drives the optimizer like any weight file
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    LSTMOptimizer([p], weights=out).step()
    assert torch.isfinite(p).all()


def test_average_weights_rejects_mixed_architectures_untrained_and_missing(tmp_path, capsys) -> None:
    from learnedopt.cli import main

    _trained_file(tmp_path / "a.safetensors", 1, hidden_size=6)
    _trained_file(tmp_path / "b.safetensors", 2, hidden_size=8)
    (tmp_path / "copy.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes())
    save_weights(CoordinateLSTM(hidden_size=6), tmp_path / "untrained.safetensors", trained=False)
    cases = [
        ([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], "only weights of one architecture"),
        ([str(tmp_path / "a.safetensors"), "l2l-2016"], "untrained weights (preset 'l2l-2016')"),
        # a file of no preset, saved with trained=False, was named "untrained weights (preset None)"
        ([str(tmp_path / "a.safetensors"), str(tmp_path / "untrained.safetensors")],
         f"{tmp_path / 'untrained.safetensors'}: untrained weights (saved with trained=False); average trained runs"),
        ([str(tmp_path / "a.safetensors"), str(tmp_path / "missing.safetensors")], "weight file not found"),
        # a misspelt preset said only "weight file not found: l2l-shrt"
        ([str(tmp_path / "a.safetensors"), "l2l-shrt"], "unknown preset 'l2l-shrt' and no such file; presets: ["),
        # the same weights twice (by path, or a copy) weighed double, silently
        ([str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors")], "holds the same weights as"),
        ([str(tmp_path / "a.safetensors"), str(tmp_path / "copy.safetensors")],
         f"{tmp_path / 'copy.safetensors'} holds the same weights as {tmp_path / 'a.safetensors'}: given twice"),
    ]
    for files, message in cases:
        assert main(["average-weights", *files, "--out", str(tmp_path / "out.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("learnedopt average-weights: error: ") and message in err and err.count("\n") == 1
        assert not (tmp_path / "out.safetensors").exists()


def test_average_weights_refuses_to_write_over_one_of_its_files(tmp_path, capsys, monkeypatch) -> None:
    """``--out`` naming one of the files (under any spelling) replaced that member with the soup,
    whose header then listed the path with a SHA-256 it no longer held."""
    from learnedopt.cli import main

    _trained_file(tmp_path / "a.safetensors", 1, hidden_size=6)
    _trained_file(tmp_path / "b.safetensors", 2, hidden_size=6)
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "b.safetensors")
    before = {name: (tmp_path / name).read_bytes() for name in ("a.safetensors", "b.safetensors")}
    monkeypatch.chdir(tmp_path)
    for out, member in (("a.safetensors", "a.safetensors"), ("./a.safetensors", "a.safetensors"),
                        (str(tmp_path / "b.safetensors"), "b.safetensors"), ("link.safetensors", "b.safetensors")):  # fmt: skip
        assert main(["average-weights", "a.safetensors", "b.safetensors", "--out", out]) == 2
        err = capsys.readouterr().err
        assert err == f"learnedopt average-weights: error: --out {out} is the file {member}, one of those averaged\n"
    assert before == {name: (tmp_path / name).read_bytes() for name in before}
    assert main(["average-weights", "a.safetensors", "b.safetensors", "--out", "soup.safetensors"]) == 0


def test_average_weights_of_no_files_is_refused() -> None:
    from learnedopt.weights import average_weights

    with pytest.raises(ValueError, match="average_weights needs at least one weight file"):
        average_weights([])


def _with_header_changes(source, target, **changes) -> None:
    header = read_header(source)
    header["config"] = {**header["config"], **changes}
    tensors = {name: tensor for name, tensor in load_weights(source)[0].state_dict().items()}
    save_file(tensors, str(target), metadata={"learnedopt": json.dumps(header)})


@pytest.mark.parametrize(("cls", "change", "message"), [
    (CoordinateLSTM, {"output_scale": float("nan")}, "output_scale must be finite"),
    (CoordinateLSTM, {"output_scale": float("inf")}, "output_scale must be finite"),
    (CoordinateLSTM, {"preprocess_p": float("nan")}, "preprocess_p must be in \\(0, 87.34\\]"),
    (CoordinateLSTM, {"preprocess_p": float("inf")}, "preprocess_p must be in \\(0, 87.34\\]"),
    (MetaLSTMCell, {"preprocess_p": float("nan")}, "preprocess_p must be in \\(0, 87.34\\]"),
    # finite in the header (a JSON double) but not in the rule's float32 math
    (CoordinateLSTM, {"output_scale": 1e300}, "output_scale must be finite in float32"),
    # the untrained initialisation divides by it: a ZeroDivisionError, or a float32 overflow
    (CoordinateLSTM, {"output_scale": 0.0}, "output_scale must be nonzero"),
    (CoordinateLSTM, {"output_scale": 1e-45}, "output_scale must be nonzero"),
    (CoordinateLSTM, {"preprocess_p": 100.0}, "preprocess_p must be in \\(0, 87.34\\]"),
    (MetaLSTMCell, {"preprocess_p": 1e39}, "preprocess_p must be in \\(0, 87.34\\]"),
    (MetaLSTMCell, {"step_scale": 1e39}, "step_scale must be positive and finite in float32"),
    (MetaLSTMCell, {"input_bias_init": [-1e300, -4.0]}, "input_bias_init must be a range"),
])  # fmt: skip
def test_a_header_with_an_architecture_constant_not_finite_in_float32_is_rejected(tmp_path, cls, change, message) -> None:
    """The weights are finite, but a NaN output scale in the header used to load and turn every
    step into NaN; an output scale of 1e300 set every float32 parameter to -Inf at the first
    step, a bias range of 1e300 was a RuntimeError from the rule's initialisation, p = 100
    made a zero gradient's feature NaN, and an output scale of 0 was a bare ZeroDivisionError."""
    good = tmp_path / "good.safetensors"
    save_weights(cls(), good)
    bad = tmp_path / "bad.safetensors"
    _with_header_changes(good, bad, **change)
    with pytest.raises(ValueError, match=rf"bad.safetensors: invalid {cls.kind} config in header: {message}"):
        load_weights(bad)


def test_a_header_config_value_of_the_wrong_type_is_a_value_error_naming_the_file(tmp_path) -> None:
    """A decay list written as one number, or a number as a string: the error names the file
    and the field (it was a TypeError from inside the checks, "Value after * must be an
    iterable, not float")."""
    good = tmp_path / "good.safetensors"
    save_weights(CoordinateLSTM(momentum_decays=(0.9,)), good)
    bad = tmp_path / "bad.safetensors"
    _with_header_changes(good, bad, momentum_decays=0.9)
    with pytest.raises(ValueError, match=r"bad.safetensors: invalid CoordinateLSTM config in header: momentum_decays must"):
        load_weights(bad)
    _with_header_changes(good, bad, output_scale="0.1")
    with pytest.raises(ValueError, match=r"bad.safetensors: invalid CoordinateLSTM config in header: output_scale must"):
        load_weights(bad)


def test_a_file_has_the_fingerprint_of_the_rule_it_was_saved_from(tmp_path) -> None:
    """The fingerprint is of the weights as a file holds them (float32): a float64 rule, its file,
    and a float32 copy of it are one identity, so a resume check against the file accepts them."""
    from learnedopt.weights import fingerprint

    rule = CoordinateLSTM(hidden_size=4).double()
    with torch.no_grad():
        for param in rule.parameters():
            param.copy_(param.float())  # values a float32 file holds exactly
    save_weights(rule, tmp_path / "w.safetensors")
    loaded, _ = load_weights(tmp_path / "w.safetensors")
    assert fingerprint(loaded) == fingerprint(rule) == fingerprint(rule.float())
    with torch.no_grad():
        loaded.head.bias.add_(1.0)
    assert fingerprint(loaded)["sha256"] != fingerprint(rule)["sha256"]


@pytest.mark.parametrize(("value", "dtype", "message"), [
    (1e300, torch.float64, r"NaN or Inf \(in float32\) in \['head.bias'\]"),  # finite in the file, Inf as float32
    (1, torch.int64, r"weights \['head.bias'\] are not floating-point tensors"),
])  # fmt: skip
def test_weights_that_are_not_finite_float32_values_are_rejected(tmp_path, value, dtype, message) -> None:
    good = tmp_path / "good.safetensors"
    save_weights(CoordinateLSTM(), good)
    tensors = dict(load_weights(good)[0].state_dict())
    tensors["head.bias"] = torch.full_like(tensors["head.bias"], value, dtype=dtype)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"learnedopt": json.dumps(read_header(good))})
    with pytest.raises(ValueError, match=message):
        load_weights(bad)


def test_a_failed_save_leaves_no_temporary_file_and_files_get_the_umask_permissions(tmp_path) -> None:
    """safetensors writes owner-only files; a weight file is shared like any other output. A
    write onto a folder fails and leaves nothing beside it."""
    import os

    path = tmp_path / "w.safetensors"
    save_weights(CoordinateLSTM(), path)
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(OSError):
        save_weights(CoordinateLSTM(), folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "w.safetensors"]
    assert list(folder.iterdir()) == []


def test_an_atomic_write_reaches_the_disk_before_its_rename_and_the_rename_before_it_returns(tmp_path, monkeypatch) -> None:
    """An OS crash or power loss after a rename whose file was not yet synced can leave an empty
    file under the new name (a checkpoint that --resume refuses): fsync the file, then rename,
    then fsync the folder."""
    import os

    from learnedopt import files

    events = []
    opened: dict[int, str] = {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def open_(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = os.path.basename(os.fspath(path))
        return fd

    def fsync(fd):
        events.append(("fsync", opened[fd]))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(os.fspath(dst))))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.write_atomically(tmp_path / "checkpoint.pt", lambda tmp: tmp.write_bytes(b"state"))
    assert events == [("fsync", "checkpoint.pt.tmp"), ("replace", "checkpoint.pt"), ("fsync", tmp_path.name)]
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"state"


@pytest.mark.parametrize("failing", ["file", "folder"])
def test_an_atomic_write_fails_when_its_file_cannot_be_synced_not_when_its_folder_cannot(tmp_path, monkeypatch, failing) -> None:
    """An fsync of the temporary file that fails (EIO: the data may not be on the disk) fails the
    write, leaving the old file and no temporary one; the folder's, which some file systems
    refuse, is skipped: the file is written."""
    import errno
    import os

    from learnedopt import files

    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    opened: dict[int, str] = {}
    real_open, real_fsync = os.open, os.fsync

    def open_(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = "file" if os.fspath(path).endswith(".tmp") else "folder"
        return fd

    def fsync(fd):
        if opened[fd] == failing:
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    write = lambda tmp: tmp.write_bytes(b"new")  # noqa: E731
    if failing == "file":
        with pytest.raises(OSError, match="Input/output error"):
            files.write_atomically(target, write)
        assert target.read_bytes() == b"old"
    else:
        files.write_atomically(target, write)
        assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_few_shot_model_file_given_as_weights_and_the_reverse_say_which_file_they_are(tmp_path) -> None:
    """Both formats are learnedopt files: "not a learnedopt weight file" sent the user of a
    meta-lstm run's model.safetensors looking for another file; the message names what the
    file is and how to get its learned update."""
    from learnedopt import LSTMOptimizer, MetaLSTMOptimizer
    from learnedopt.meta.fewshot import FewShotConfig, FewShotLearner, LearnerSpec, load_learner, save_learner
    from learnedopt.meta.fewshot.config import fewshot_defaults

    model = tmp_path / "model.safetensors"
    config = FewShotConfig(algo="meta-lstm", task="sinusoid", **fewshot_defaults("meta-lstm", "sinusoid", None))
    save_learner(FewShotLearner(LearnerSpec.for_config(config), seed=0), model)
    for make in (load_weights, lambda p: LSTMOptimizer([torch.zeros(2, requires_grad=True)], weights=p)):
        with pytest.raises(ValueError, match=r"model\.safetensors: not a weight file but a few-shot model file \(.*\); a meta-lstm "
                           r"model's learned update is learnedopt\.meta\.fewshot\.load_learner\(path\)\[0\]\.rule"):
            make(model)
    rule = load_learner(model)[0].rule  # the way the message gives
    save_weights(rule, tmp_path / "rule.safetensors")
    MetaLSTMOptimizer([torch.zeros(2, requires_grad=True)], weights=str(tmp_path / "rule.safetensors"))

    weights = tmp_path / "weights.safetensors"
    save_weights(CoordinateLSTM(), weights)
    with pytest.raises(ValueError, match=r"weights\.safetensors: not a few-shot model file but an update rule's weight file \(.*\)$"):
        load_learner(weights)


def test_a_run_folder_given_for_its_weight_file_names_the_files_it_holds(tmp_path, capsys) -> None:
    """``weights="runs/x"`` (the --out, not its weights.safetensors) said "weight file not found"."""
    from learnedopt import LSTMOptimizer
    from learnedopt.cli import main

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match=r"not found: .*run \(.*run is a folder\)$"):
        load_weights(run)
    save_weights(CoordinateLSTM(), run / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match=r"run is a folder holding weights\.safetensors: give it\)$"):
        LSTMOptimizer([torch.zeros(2, requires_grad=True)], weights=str(run))
    assert main(["meta-train", "--preset", str(run), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "run is a folder holding weights.safetensors: give it); presets:" in capsys.readouterr().err


def test_load_weights_takes_a_preset_name_as_weights_does() -> None:
    """``load_weights("l2l-blend")`` said "weight file not found: l2l-blend", so the rule to pass
    once to ``Reptile(inner_optimizer=lambda p: LSTMOptimizer(p, weights=rule))`` (as its docstring
    advises) could not be had by the preset's name (found by the user study)."""
    rule, header = load_weights("l2l-blend")
    optimizer = LSTMOptimizer([torch.zeros(2, requires_grad=True)])
    assert header["preset"] == "l2l-blend" and header["trained"] is True
    assert all(torch.equal(a, b) for a, b in zip(rule.state_dict().values(), optimizer.rule.state_dict().values()))
    assert load_weights("meta-lstm-2017")[1]["trained"] is False
    with pytest.raises(ValueError, match=r"unknown preset 'l2l-blnd' and no such file; presets: \["):
        load_weights("l2l-blnd")


def test_read_header_takes_a_preset_name_as_load_weights_does(tmp_path, monkeypatch) -> None:
    """``read_header("l2l-blend")`` said "weight file not found: l2l-blend" where ``load_weights``
    built the preset; a preset's name still wins over a file of that name, as in ``load_weights``."""
    for name in ("l2l-blend", "meta-lstm-2017"):  # a shipped file's, an untrained preset's
        assert read_header(name) == load_weights(name)[1]
    assert read_header("l2l-blend")["preset"] == "l2l-blend"
    monkeypatch.chdir(tmp_path)
    save_weights(MetaLSTMCell(), Path("l2l-blend"))  # the string is refused: it would read as the preset
    assert read_header("l2l-blend")["kind"] == "CoordinateLSTM"
    assert read_header(Path("l2l-blend"))["kind"] == "MetaLSTMCell"  # a path is a file
    with pytest.raises(ValueError, match=r"unknown preset 'l2l-blnd' and no such file; presets: \["):
        read_header("l2l-blnd")


def test_a_rule_on_the_meta_device_is_refused_by_name_where_its_values_are_needed(tmp_path) -> None:
    """``fingerprint``, ``save_weights`` and ``weights=`` of a rule built under
    ``torch.device("meta")`` raised torch's raw "Cannot copy out of meta tensor; no data!"."""
    from learnedopt.weights import fingerprint

    with torch.device("meta"):
        rule = CoordinateLSTM()
    meta = r"the CoordinateLSTM has no weights to {}: 10 of its 10 tensors \('head.bias' first\) live on the meta device"
    with pytest.raises(ValueError, match=meta.format("fingerprint")):
        fingerprint(rule)
    with pytest.raises(ValueError, match=meta.format("save")):
        save_weights(rule, tmp_path / "w.safetensors")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=meta.format("step LSTMOptimizer's parameters with")):
        LSTMOptimizer([torch.zeros(2, requires_grad=True)], weights=rule)
    rule.to_empty(device="cpu").load_state_dict(CoordinateLSTM().state_dict())  # as the message advises
    save_weights(rule, tmp_path / "w.safetensors")
    assert fingerprint(load_weights(tmp_path / "w.safetensors")[0]) == fingerprint(rule)


def test_a_header_stating_a_far_larger_architecture_than_its_tensors_is_refused_before_building_it(tmp_path) -> None:
    """hidden_size 100000 over the tensors of hidden 20: the rule was built first, a 160 GB
    allocation and a raw RuntimeError from torch's allocator (num_layers 10**6: no answer)."""
    good = tmp_path / "good.safetensors"
    save_weights(CoordinateLSTM(), good)
    bad = tmp_path / "bad.safetensors"
    for change in ({"hidden_size": 100_000}, {"num_layers": 100_000}):
        _with_header_changes(good, bad, **change)
        with pytest.raises(ValueError, match=r"bad.safetensors: tensors do not match the CoordinateLSTM architecture"):
            load_weights(bad)


def test_a_rule_that_cannot_say_its_shapes_without_building_still_loads_and_is_checked(tmp_path, monkeypatch) -> None:
    """A rule of your own whose constructor fails on the meta device (where the default
    ``weight_shapes`` builds it): its files load as before, compared once the rule is built."""
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    saved = CoordinateLSTM()
    save_weights(saved, good)
    _with_header_changes(good, bad, hidden_size=8)

    def fails_on_meta(cls, values):
        raise NotImplementedError("Cannot copy out of meta tensor")

    monkeypatch.setattr(CoordinateLSTM, "weight_shapes", classmethod(fails_on_meta))
    rule, _ = load_weights(good)
    assert rule.state_dict().keys() == saved.state_dict().keys()
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in rule.state_dict().items())
    with pytest.raises(ValueError, match=r"bad.safetensors: tensors do not match the CoordinateLSTM architecture"):
        load_weights(bad)


@pytest.mark.parametrize("config", [{}, {"hidden_size": 3, "num_layers": 1}, {"num_layers": 3, "momentum_decays": [0.9],
                                    "rms_decays": [0.99, 0.999], "param_input": True}])  # fmt: skip
def test_coordinate_lstm_weight_shapes_are_those_of_the_rule_it_builds(config) -> None:
    from learnedopt.nn.base import UpdateRule

    rule = CoordinateLSTM.from_config_dict(config)
    built = {k: tuple(v.shape) for k, v in rule.state_dict().items()}
    assert CoordinateLSTM.weight_shapes(config) == built == UpdateRule.weight_shapes.__func__(CoordinateLSTM, config)
    assert list(CoordinateLSTM.weight_shapes(config)) == list(built)  # the file's order, too
    assert CoordinateLSTM.weight_count(config) == len(built)
    for values in ({"hidden_size": 5}, {"momentum_decay": 0.9, "rms_decay": 0.999}):
        built = {k: tuple(v.shape) for k, v in MetaLSTMCell.from_config_dict(values).state_dict().items()}
        assert list(MetaLSTMCell.weight_shapes(values).items()) == list(built.items())
        assert UpdateRule.weight_shapes.__func__(MetaLSTMCell, values) == built


def test_an_implausibly_large_header_is_refused_at_once(tmp_path, monkeypatch) -> None:
    """num_layers 10**9 over two layers' tensors: the 4 * 10**9 expected shapes were listed (hours)
    before any was compared; a MetaLSTMCell of hidden size 10**12 overflowed torch's size
    calculation on the meta device, so the rule was built on the CPU: a raw allocator error."""
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_weights(CoordinateLSTM(), good)
    _with_header_changes(good, bad, num_layers=10**9)

    def listed(cls, values):
        raise ValueError("weight_shapes listed the layers")

    with monkeypatch.context() as patch:
        patch.setattr(CoordinateLSTM, "weight_shapes", classmethod(listed))
        with pytest.raises(ValueError, match=r"bad.safetensors: tensors do not match the CoordinateLSTM architecture "
                                             r"\{.*\}: it has 4000000002 weight tensors, the file 10$"):  # fmt: skip
            load_weights(bad)
    save_weights(MetaLSTMCell(), good)
    _with_header_changes(good, bad, hidden_size=10**12)
    wrong = "'lstm.bias_hh_l0', 'lstm.bias_ih_l0', 'lstm.weight_hh_l0', 'lstm.weight_ih_l0', 'weight_fi'"
    with pytest.raises(ValueError, match=r"bad.safetensors: tensors do not match the MetaLSTMCell architecture "
                                         rf".*\(missing \[\], unexpected \[\], wrong shape \[{wrong}\]\)$"):  # fmt: skip
        load_weights(bad)


@pytest.mark.parametrize(("change", "message"), [
    ({"trained": "no"}, r"header's 'trained' must be true or false or null, got 'no'"),
    ({"trained": False, "preset": ["l2l-2016"]}, r"header's 'preset' must be a preset's name or null, got \['l2l-2016'\]"),
    ({"format": True}, r"unsupported weight format True"),
])  # fmt: skip
def test_header_fields_of_the_wrong_type_are_refused_naming_the_file(tmp_path, change, message) -> None:
    """"trained": "no" loaded as trained (no warning), a list as the preset of an untrained file
    was a bare "unhashable type: 'list'" TypeError from the optimizer, and format true read as 1."""
    good = tmp_path / "good.safetensors"
    save_weights(CoordinateLSTM(), good)
    bad = tmp_path / "bad.safetensors"
    tensors = dict(load_weights(good)[0].state_dict())
    save_file(tensors, str(bad), metadata={"learnedopt": json.dumps({**read_header(good), **change})})
    for load in (load_weights, lambda p: LSTMOptimizer([torch.zeros(2, requires_grad=True)], weights=p)):
        with pytest.raises(ValueError, match=rf"bad.safetensors: .*{message}"):
            load(bad)


@pytest.mark.parametrize("key", ["format", "kind", "config", "trained"])
def test_extra_header_keys_may_not_replace_the_files_own(tmp_path, key) -> None:
    """``extra={"config": ...}`` (meta-train's config, say) replaced the architecture and wrote a
    file that did not load; ``extra={"trained": ...}`` silently overrode the argument."""
    from learnedopt.weights import RESERVED_HEADER_KEYS

    with pytest.raises(ValueError, match=rf"extra header keys \['{key}'\] are the weight file's own; reserved: \["):
        save_weights(CoordinateLSTM(), tmp_path / "w.safetensors", extra={key: 2, "command": "x"})
    assert not (tmp_path / "w.safetensors").exists()
    save_weights(CoordinateLSTM(), tmp_path / "w.safetensors", extra={"command": "x"})
    assert set(RESERVED_HEADER_KEYS) <= set(read_header(tmp_path / "w.safetensors")) | {"rule_class"}


@pytest.mark.parametrize(("cls", "rule", "name"), [
    (LSTMOptimizer, CoordinateLSTM(), "head.bias"),
    (MetaLSTMOptimizer, MetaLSTMCell(), "bias_fi"),
])  # fmt: skip
def test_a_module_with_non_finite_weights_is_refused_as_its_file_is(cls, rule, name) -> None:
    """The file of such a rule is refused; the module itself was taken, and its first step turned
    every parameter NaN."""
    with torch.no_grad():
        rule.get_parameter(name).view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: the {rule.kind} given as weights has NaN or Inf in \['{name}'\]$"):
        cls([torch.zeros(2, requires_grad=True)], weights=rule)


def test_an_empty_weights_string_is_an_unknown_preset_not_the_current_folder() -> None:
    """``weights=""`` said "weight file not found: . (. is a folder)"."""
    for load in (load_weights, lambda w: LSTMOptimizer([torch.zeros(2, requires_grad=True)], weights=w)):
        with pytest.raises(ValueError, match=r"unknown preset '' and no such file; presets: \["):
            load("")


def test_average_weights_of_one_path_not_in_a_list_says_so(tmp_path) -> None:
    """average_weights("run/weights.safetensors") read the string as files "r", "u", ...: "weight
    file not found: r" (or "/ is a folder")."""
    from learnedopt.weights import average_weights

    _trained_file(tmp_path / "w.safetensors", 1)
    for given in (str(tmp_path / "w.safetensors"), tmp_path / "w.safetensors"):
        with pytest.raises(TypeError, match=r"^average_weights takes a list of weight files or presets, got one "):
            average_weights(given)


def test_a_save_into_a_missing_folder_or_onto_a_folder_names_the_path(tmp_path) -> None:
    """The missing folder was safetensors' SafetensorError (not an OSError) naming only the
    temporary file, "I/O error: No such file or directory ... at path .../nodir/.tmpXb3k"."""
    with pytest.raises(FileNotFoundError, match=rf"^no such folder: {re.escape(str(tmp_path / 'nodir'))} \(to write w.safetensors in\)$"):
        save_weights(CoordinateLSTM(), tmp_path / "nodir" / "w.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match=r"folder is a folder, not a file$"):
        save_weights(CoordinateLSTM(), tmp_path / "folder")


def test_a_symbolic_link_that_leads_nowhere_says_so(tmp_path) -> None:
    """A link loop or a dangling link said only "weight file not found", though `ls` lists it."""
    (tmp_path / "a.safetensors").symlink_to(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "a.safetensors")
    (tmp_path / "gone.safetensors").symlink_to(tmp_path / "deleted.safetensors")
    for name, target in (("a", "b"), ("gone", "deleted")):
        with pytest.raises(FileNotFoundError, match=rf"{name}.safetensors is a symbolic link to .*{target}.safetensors, which does "
                           r"not resolve to a file\)$"):
            load_weights(tmp_path / f"{name}.safetensors")


@pytest.mark.parametrize("scale", [0.0, -0.0, 1e-40])
def test_a_coordinate_lstm_with_an_output_scale_it_cannot_divide_by_is_refused_by_name(scale) -> None:
    """Its initialisation sets the head to ``-lr / (output_scale * |h|)``: 0 was a bare
    ZeroDivisionError, a subnormal scale torch's "cannot be converted to type float"."""
    with pytest.raises(ValueError, match=r"output_scale must be nonzero"):
        CoordinateLSTM(output_scale=scale)
    CoordinateLSTM(output_scale=-0.1)  # a negative scale is a rule too


def _pretrained_copy(tmp_path, monkeypatch) -> Path:
    """A copy of ``learnedopt/pretrained`` that the presets load from, to damage."""
    import contextlib
    import shutil
    import types
    from importlib import resources

    import learnedopt.weights

    folder = tmp_path / "pretrained"
    shutil.copytree(Path(str(resources.files("learnedopt.pretrained"))), folder)
    monkeypatch.setattr(learnedopt.weights, "resources", types.SimpleNamespace(files=lambda _: folder, as_file=contextlib.nullcontext))
    return folder


@pytest.mark.parametrize("cls", [LSTMOptimizer, MetaLSTMOptimizer])
def test_a_shipped_preset_damaged_on_disk_is_refused_not_loaded_as_other_weights(cls, tmp_path, monkeypatch) -> None:
    """safetensors has no checksum: a flipped bit in a tensor of a shipped preset (a bad disk,
    a botched copy) loaded as finite, other weights, under the preset's name and without a word."""
    preset = PRESETS[cls.default_preset]
    path = _pretrained_copy(tmp_path, monkeypatch) / preset.file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the low mantissa bit of the last float32: still finite, just other weights
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"preset {cls.default_preset!r}: .*{preset.file} does not hold the weights "
                                         r"it shipped with \(SHA-256 [0-9a-f]{12}\.\.\., expected [0-9a-f]{12}\.\.\.\)"):
        cls([torch.zeros(2, requires_grad=True)])


def test_every_shipped_preset_records_the_weights_it_ships() -> None:
    from learnedopt.weights import fingerprint

    for name, preset in PRESETS.items():
        if preset.file is not None:
            assert preset.sha256 == fingerprint(build_preset(name)[0])["sha256"], name


@pytest.mark.parametrize(("damage", "error"), [
    (lambda path: path.unlink(), FileNotFoundError),
    (lambda path: path.write_bytes(b""), ValueError),
])  # fmt: skip
def test_a_shipped_preset_missing_or_unreadable_names_the_preset_not_only_a_file(tmp_path, monkeypatch, damage, error) -> None:
    """LSTMOptimizer(model.parameters()) names no file, yet said only "weight file not found:
    .../l2l-blend.safetensors" where the package was installed without its data."""
    damage(_pretrained_copy(tmp_path, monkeypatch) / PRESETS["l2l-blend"].file)
    with pytest.raises(error, match=r"^preset 'l2l-blend': .*l2l-blend.safetensors.*; reinstall learnedopt$"):
        LSTMOptimizer([torch.zeros(2, requires_grad=True)])


@pytest.mark.parametrize("edit", [
    lambda raw: raw.replace('"hidden_size": 20', '"hidden_size": ' + "9" * 5000),  # past Python's int-digit limit
    lambda raw: raw.replace('"trained_on": null', '"trained_on": ' + "[" * 100_000 + "]" * 100_000),  # past the recursion limit
])  # fmt: skip
def test_a_header_json_cannot_parse_is_a_value_error_naming_the_file(tmp_path, edit) -> None:
    """json.loads raises a bare ValueError ("Exceeds the limit (4300 digits) for integer string
    conversion") or a RecursionError for these, not the JSONDecodeError that was caught."""
    good = tmp_path / "good.safetensors"
    save_weights(CoordinateLSTM(), good)
    raw = json.dumps(read_header(good))
    assert edit(raw) != raw
    bad = tmp_path / "bad.safetensors"
    save_file(load_weights(good)[0].state_dict(), str(bad), metadata={"learnedopt": edit(raw)})
    with pytest.raises(ValueError, match=r"bad.safetensors: learnedopt header is not valid JSON: "):
        load_weights(bad)


def test_a_header_with_a_huge_list_in_its_config_is_refused_in_a_short_message(tmp_path) -> None:
    """momentum_decays of 10**6 entries over the tensors of three: the message printed the whole
    config, 5 MB on one line."""
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_weights(CoordinateLSTM(momentum_decays=(0.5, 0.9, 0.99)), good)
    _with_header_changes(good, bad, momentum_decays=[0.5] * 10**6)
    with pytest.raises(ValueError) as caught:
        load_weights(bad)
    message = str(caught.value)
    assert re.fullmatch(r".*bad.safetensors: tensors do not match the CoordinateLSTM architecture \{'hidden_size': 20, .*"
                        r"'momentum_decays': \[0.5, 0.5, .*\.\.\.\], .*wrong shape \['lstm.weight_ih_l0'\]\)", message), message
    assert len(message) < 1000


def test_average_weights_does_not_depend_on_the_file_order_even_where_the_float64_sum_rounds(tmp_path) -> None:
    """Values 2**60 apart: (1 + 2**-60) - 1 is 0 in float64, (1 - 1) + 2**-60 is not, so the
    mean depended on the order of the files the README says it does not depend on."""
    from itertools import permutations

    from learnedopt.weights import average_weights

    paths = []
    for i, value in enumerate((1.0, 2.0**-60, -1.0)):
        rule = CoordinateLSTM(hidden_size=4)
        with torch.no_grad():
            rule.head.bias.fill_(value)
            next(rule.parameters()).add_(i)  # else the same weights twice
        paths.append(tmp_path / f"r{i}.safetensors")
        save_weights(rule, paths[-1])
    biases = {average_weights(list(order))[0].head.bias.item() for order in permutations(paths)}
    assert len(biases) == 1, biases


@pytest.mark.parametrize(("dtype", "value"), [(torch.float32, float("nan")), (torch.float64, 1e300)])
def test_save_weights_refuses_weights_no_load_would_take(tmp_path, dtype, value) -> None:
    """A NaN weight, or a float64 one past float32's range (Inf once stored in float32), was
    written without a word into a file that load_weights then always refused."""
    rule = CoordinateLSTM(hidden_size=4).to(dtype)
    with torch.no_grad():
        rule.head.bias.fill_(value)
    path = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match=r"^cannot save the CoordinateLSTM: its weights \['head.bias'\] are NaN or Inf "
                                         r"in float32, which no load takes$"):  # fmt: skip
        save_weights(rule, path)
    assert not path.exists()


def test_a_weight_file_named_as_a_preset_is_refused_as_weights_of_that_name_load_the_preset(tmp_path, monkeypatch, capsys) -> None:
    """``average-weights ... --out l2l-blend`` wrote ./l2l-blend, and weights="l2l-blend" then
    loaded the shipped preset, not that file, without a word."""
    from learnedopt.cli import main

    monkeypatch.chdir(tmp_path)
    message = r"'l2l-blend' is a preset's name: weights='l2l-blend' loads the preset, not a file of that name; name the file l2l-blend.safetensors"
    with pytest.raises(ValueError, match=rf"^{message}$"):
        save_weights(CoordinateLSTM(hidden_size=4), "l2l-blend")
    assert main(["average-weights", "l2l-short", "l2l-random", "--out", "l2l-blend"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "l2l-blend").exists()
    save_weights(CoordinateLSTM(hidden_size=4), "./l2l-blend")  # a path no preset is called: loads as the file
    assert load_weights("./l2l-blend")[0].config.hidden_size == 4


@pytest.mark.parametrize("cls", [CoordinateLSTM, MetaLSTMCell])
def test_a_preprocess_p_too_small_for_float32_is_refused_not_stepped_to_nan(tmp_path, cls) -> None:
    """p = 1e-300 is positive, but 0 in float32: every step divided log|g| by it and turned the
    parameters NaN without an error (p = 1e-40 did for a gradient of 10: log 10 / p is Inf)."""
    for p in (1e-300, 1e-40):
        with pytest.raises(ValueError, match=r"preprocess_p must be at least 2.61e-37 \(log\|g\| / p finite in float32\), got "):
            cls(preprocess_p=p)
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_weights(cls(), good)
    _with_header_changes(good, bad, preprocess_p=1e-300)
    with pytest.raises(ValueError, match=rf"bad.safetensors: invalid {cls.kind} config in header: preprocess_p must be at least"):
        load_weights(bad)
    # the smallest p taken steps finitely on any finite gradient
    from learnedopt.nn.functional import MIN_PREPROCESS_P

    optimizer = {CoordinateLSTM: LSTMOptimizer, MetaLSTMCell: MetaLSTMOptimizer}[cls]
    param = torch.nn.Parameter(torch.zeros(4))
    opt = optimizer([param], weights=cls(preprocess_p=MIN_PREPROCESS_P))
    param.grad = torch.tensor([0.0, 1e-3, 10.0, torch.finfo(torch.float32).max])
    opt.step(**({"loss": torch.tensor(1.0)} if cls is MetaLSTMCell else {}))
    assert torch.isfinite(param).all()


def test_average_weights_of_an_iterator_of_paths_refuses_as_a_list_does(tmp_path) -> None:
    """The mismatch message indexed ``paths[0]``: a generator of paths got "'generator' object is
    not subscriptable" instead, and an empty one an IndexError."""
    from learnedopt.weights import average_weights

    other = tmp_path / "other.safetensors"
    save_weights(CoordinateLSTM(hidden_size=4), other)
    with pytest.raises(ValueError, match=r"other.safetensors is a CoordinateLSTM .* but l2l-short is a CoordinateLSTM"):
        average_weights(p for p in ["l2l-short", other])
    with pytest.raises(ValueError, match=r"^average_weights needs at least one weight file$"):
        average_weights(iter([]))


def test_average_weights_under_swapped_module_params_equals_the_average_without() -> None:
    """``average_weights`` loads the mean into a fresh rule, which raised under torch's opt-in
    ``set_swap_module_params_on_conversion(True)`` (an ``nn.LSTM``'s parameters refuse the swap)."""
    from learnedopt.weights import average_weights, fingerprint

    expected = fingerprint(average_weights(["l2l-short", "l2l-random"])[0])
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        got = fingerprint(average_weights(["l2l-short", "l2l-random"])[0])
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert got == expected


@pytest.mark.parametrize("given", [b"l2l-blend", bytearray(b"x"), 3, None, ["l2l-blend"]])
def test_load_weights_of_anything_but_a_name_or_path_is_a_type_error_naming_what_it_takes(tmp_path, given) -> None:
    """``load_weights(bytes)`` (a file's contents, or a path in bytes: Python's os takes both) was
    pathlib's bare "argument should be a str or an os.PathLike object ..., not <class 'bytes'>",
    an int or None "expected str, bytes or os.PathLike object". Refused in one line naming what
    it takes, by ``read_header`` and ``average_weights`` too (which read ``b'x'`` as a preset)."""
    from learnedopt.weights import average_weights

    path = tmp_path / "rule.safetensors"
    save_weights(CoordinateLSTM(), path)
    taken = "takes a preset's name or a weight file's path (a str or os.PathLike), got "
    for call, who in ((load_weights, "load_weights"), (read_header, "read_header"), (lambda w: average_weights([path, w]), "average_weights")):
        with pytest.raises(TypeError, match="^" + re.escape(f"{who} {taken}{type(given).__name__}")) as error:
            call(given)
        assert "\n" not in str(error.value)
    with pytest.raises(TypeError, match=re.escape("a path in bytes: os.fsdecode(path); a file's contents: write them to a file first")):
        load_weights(path.read_bytes())
    assert load_weights(path)[1]["kind"] == "CoordinateLSTM"


@pytest.mark.parametrize("given", [b"rule.safetensors", 3, None])
def test_the_other_file_functions_refuse_anything_but_a_path_as_load_weights_does(tmp_path, monkeypatch, given) -> None:
    """``save_weights``, ``save_learner`` and ``load_learner`` said pathlib's "expected str, bytes or
    os.PathLike object, not int" (bytes named as taken) or "argument should be a str object ...,
    not <class 'bytes'>", naming no function."""
    from learnedopt.meta.fewshot import FewShotLearner, LearnerSpec, load_learner, save_learner

    monkeypatch.chdir(tmp_path)  # where a bytes path would have been written
    spec = LearnerSpec(algo="maml", architecture={"kind": "mlp", "sizes": [1, 2, 1], "activation": "relu"},
                       loss="mse", inner_steps=1, test_inner_steps=1, inner_lr=0.1)  # fmt: skip
    calls = {
        "save_weights": (lambda p: save_weights(CoordinateLSTM(), p), "a weight file's path"),
        "save_learner": (lambda p: save_learner(FewShotLearner(spec, seed=0), p), "a few-shot model file's path"),
        "load_learner": (load_learner, "a few-shot model file's path"),
    }
    for who, (call, takes) in calls.items():
        with pytest.raises(TypeError, match="^" + re.escape(f"{who} takes {takes} (a str or os.PathLike), got {type(given).__name__}")):
            call(given)
    assert not list(tmp_path.iterdir())


def test_loading_and_averaging_weights_leave_the_global_rng_as_it_was(tmp_path) -> None:
    """A rule built to hold loaded (or averaged) weights drew its discarded random
    initialisation from torch's global generator, changing a seeded script's later draws."""
    from learnedopt.weights import average_weights

    for i in range(2):
        save_weights(CoordinateLSTM(hidden_size=4), tmp_path / f"{i}.safetensors")
    calls = [
        lambda: load_weights("l2l-blend"),
        lambda: load_weights("meta-lstm-2017"),
        lambda: load_weights(tmp_path / "0.safetensors"),
        lambda: average_weights([tmp_path / "0.safetensors", tmp_path / "1.safetensors"]),
    ]
    for call in calls:
        torch.manual_seed(0)
        expected = torch.rand(4)
        torch.manual_seed(0)
        call()
        assert torch.equal(torch.rand(4), expected)


#: The SHA-256 (:func:`fingerprint`) of each untrained preset's weights, as built at commit
#: 0f9a89c, when its rule was built on the CPU with a random initialisation and then reset
#: from the preset's seed: building it otherwise must give the same bits.
_UNTRAINED_PRESET_SHA256 = {
    "l2l-2016": "3b7d95e725a2a1a69c441374716b698415506815a2373713ccff47a3f8db7549",
    "meta-lstm-2017": "6b31c2cd964789e40b36d844a7210629c1816743d9cd4e6ffcc52cb2d106d3a8",
    "meta-lstm-adam": "de2f124be5c0b32f949570555c6d4b416e1c4e1e559efc4902f50d91858ca5e1",
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_untrained_presets_keep_their_weights(dtype: torch.dtype) -> None:
    from learnedopt.weights import fingerprint

    assert sorted(_UNTRAINED_PRESET_SHA256) == sorted(name for name, p in PRESETS.items() if p.file is None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        built = {name: fingerprint(build_preset(name)[0])["sha256"] for name in _UNTRAINED_PRESET_SHA256}
    finally:
        torch.set_default_dtype(previous)
    assert built == _UNTRAINED_PRESET_SHA256


def _run_in_another_thread_while_building_rules(monkeypatch, target) -> None:
    """Make every ``CoordinateLSTM`` and ``MetaLSTMCell`` construction first run ``target`` in
    another thread (to its end), so that it acts while a rule is being built."""
    import threading

    def constructing(init):
        def wrapped(self, *args, **kwargs):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
            init(self, *args, **kwargs)

        return wrapped

    for cls in (CoordinateLSTM, MetaLSTMCell):
        monkeypatch.setattr(cls, "__init__", constructing(cls.__init__))


def test_building_a_rule_leaves_another_threads_draws_from_the_global_rng_alone(tmp_path, monkeypatch) -> None:
    """Building saved torch's global generator and restored it afterwards (``fork_rng``), so that
    what another thread drew from it meanwhile was drawn again: its draws repeated. Here the
    other thread draws while the rule is being constructed; its next draw must follow on."""
    from learnedopt.weights import average_weights

    for i in range(2):
        save_weights(CoordinateLSTM(hidden_size=4), tmp_path / f"{i}.safetensors")
    save_weights(MetaLSTMCell(hidden_size=3), tmp_path / "meta.safetensors")
    draws: list[torch.Tensor] = []

    def other_thread() -> None:
        draws.append(torch.rand(4))

    _run_in_another_thread_while_building_rules(monkeypatch, other_thread)  # draws while this thread builds
    calls = {
        "load_weights(l2l-blend)": lambda: load_weights("l2l-blend"),
        "load_weights(meta-lstm-mnist)": lambda: load_weights("meta-lstm-mnist"),
        "build_preset(l2l-2016)": lambda: build_preset("l2l-2016"),
        "build_preset(meta-lstm-2017)": lambda: build_preset("meta-lstm-2017"),
        "load_weights(file)": lambda: load_weights(tmp_path / "meta.safetensors"),
        "average_weights": lambda: average_weights([tmp_path / "0.safetensors", tmp_path / "1.safetensors"]),
        "LSTMOptimizer": lambda: LSTMOptimizer([torch.zeros(2, requires_grad=True)]),
    }
    for name, call in calls.items():
        torch.manual_seed(0)
        expected = torch.rand(64).split(4)
        torch.manual_seed(0)
        draws.clear()
        call()
        assert draws, name
        after = torch.rand(4)
        assert all(torch.equal(a, b) for a, b in zip(draws, expected, strict=False)), name
        assert torch.equal(after, expected[len(draws)]), f"{name}: the other thread's draws were rolled back"


def test_the_paper_presets_hold_the_papers_configurations() -> None:
    """What the README says of ``l2l-2016`` (Andrychowicz et al. 2016: 2 layers of 20, the
    gradient's two preprocessed features, p = 10, output x 0.1) and of ``meta-lstm-2017`` and the
    trained ``meta-lstm-mnist`` (Ravi & Larochelle 2017: an input LSTM of 20 reading the
    preprocessed gradient and loss, p = 10, the cell writing the gradient itself)."""
    l2l, _ = load_weights("l2l-2016")
    assert (l2l.config.num_layers, l2l.config.hidden_size, l2l.config.preprocess_p, l2l.config.output_scale) == (2, 20, 10.0, 0.1)
    assert l2l.config.num_inputs == 2 and not l2l.reads_param
    for name in ("meta-lstm-2017", "meta-lstm-mnist"):
        rule, _ = load_weights(name)
        cfg = rule.config
        assert (cfg.hidden_size, cfg.preprocess_p, cfg.step_scale, cfg.momentum_decay, cfg.rms_decay) == (20, 10.0, 1.0, None, None), name
        assert rule.lstm.input_size == 4 and rule.lstm.num_layers == 1 and rule.needs_loss, name


class _BytesPathLike:
    """An ``os.PathLike`` whose ``__fspath__`` gives bytes (as ``os.DirEntry(bytes)`` does)."""

    def __init__(self, path: bytes) -> None:
        self.path = path

    def __fspath__(self) -> bytes:
        return self.path


def test_an_os_pathlike_of_bytes_is_refused_naming_the_function_as_bytes_are(tmp_path, monkeypatch) -> None:
    """An ``os.PathLike`` passed the type check, then pathlib raised its bare "argument should be
    a str or an os.PathLike object where __fspath__ returns a str, not 'bytes'", naming no
    function (a bytes path is refused by name; this is one)."""
    from learnedopt.meta.fewshot import FewShotLearner, LearnerSpec, load_learner, save_learner
    from learnedopt.weights import average_weights

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "rule.safetensors"
    save_weights(CoordinateLSTM(), path)
    given = _BytesPathLike(b"rule.safetensors")
    spec = LearnerSpec(algo="maml", architecture={"kind": "mlp", "sizes": [1, 2, 1], "activation": "relu"},
                       loss="mse", inner_steps=1, test_inner_steps=1, inner_lr=0.1)  # fmt: skip
    calls = {
        "load_weights": load_weights,
        "read_header": read_header,
        "average_weights": lambda p: average_weights([path, p]),
        "save_weights": lambda p: save_weights(CoordinateLSTM(), p),
        "save_learner": lambda p: save_learner(FewShotLearner(spec, seed=0), p),
        "load_learner": load_learner,
    }
    for who, call in calls.items():
        with pytest.raises(TypeError, match="^" + re.escape(f"{who} takes ") + r".*got _BytesPathLike whose __fspath__ gives bytes"
                           + re.escape(": a path in bytes: os.fsdecode(path)")) as error:  # fmt: skip
            call(given)
        assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rule.safetensors"]


@pytest.mark.parametrize("zipped", [True, False])
def test_a_torch_save_checkpoint_is_named_as_one_and_never_unpickled(tmp_path, zipped) -> None:
    """A ``.pt`` checkpoint (``torch.save``'s zip archive, or its older plain pickle) given as a
    weight file or a few-shot model file was "not a readable safetensors weight file (truncated or
    corrupt?): ... header too large": the file is whole, of another format. Named as a pickle, and
    still never unpickled (its code does not run)."""
    from learnedopt.meta.fewshot import load_learner

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle code ran')",))

    path = tmp_path / "rule.pt"
    torch.save({"state": CoordinateLSTM().state_dict(), "boom": Boom()}, path, _use_new_zipfile_serialization=zipped)
    found = "a zip archive, as torch.save writes" if zipped else "a pickle, as torch.save wrote before PyTorch 1.6"
    for call, saver in ((load_weights, "save_weights"), (read_header, "save_weights"), (load_learner, "save_learner")):
        with pytest.raises(ValueError, match="^" + re.escape(f"{path}: not a readable safetensors ") + ".* file but " + re.escape(
                found) + r".*never unpickled here.*torch\.load\(path, weights_only=True\).*" + saver) as error:  # fmt: skip
            call(path)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("length", [0x480, 0x580, 0x10280, 0x20380])
def test_a_truncated_weight_file_whose_header_length_starts_as_a_pickle_is_still_truncated(tmp_path, length) -> None:
    """A safetensors header of 1152 (0x480), 1408 (0x580), 66176 (0x10280) or 132992 (0x20380)
    bytes starts the file with the bytes of a pickle's protocol opcode (0x80, then 2 to 5); cut
    short, the file is a truncated safetensors file, not a pickle: its header (from byte 8)
    starts with '{'."""
    path = tmp_path / "w.safetensors"
    save_weights(CoordinateLSTM(), path)
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = data[8:8 + size].rstrip(b" ")
    assert len(header) <= length
    path.write_bytes(length.to_bytes(8, "little") + header + b" " * (length - len(header)) + data[8 + size:])
    assert load_weights(path)[1]["kind"] == "CoordinateLSTM"  # the file as written, whole
    path.write_bytes(path.read_bytes()[: length // 2])
    with pytest.raises(ValueError, match=r"not a readable safetensors weight file \(truncated or corrupt\?\)"):
        load_weights(path)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_given_as_a_weight_file_says_what_it_is_not_that_it_is_missing(tmp_path, capsys) -> None:
    """A shell's process substitution (``average-weights <(cat a.safetensors) ...``, a pipe at
    /dev/fd/63) said only "weight file not found: /dev/fd/63", though it exists."""
    import os

    from learnedopt.cli import main

    pipe = tmp_path / "piped.safetensors"
    os.mkfifo(pipe)
    other = tmp_path / "other.safetensors"
    save_weights(CoordinateLSTM(), other)
    message = re.escape(f"weight file not found: {pipe} ({pipe} is a named pipe, not a regular file: ") + r".*\)$"
    for call in (load_weights, read_header):
        with pytest.raises(FileNotFoundError, match=message):
            call(pipe)
    assert main(["average-weights", str(other), str(pipe), "--out", str(tmp_path / "soup.safetensors")]) == 2
    assert re.search(message, capsys.readouterr().err.strip().removeprefix("learnedopt average-weights: error: "))
    assert not (tmp_path / "soup.safetensors").exists()


@pytest.mark.parametrize(("given", "message"), [
    ({"preset": 123}, "save_weights: preset must be a preset's name (a str) or None, got int"),
    ({"preset": ["l2l-2016"]}, "save_weights: preset must be a preset's name (a str) or None, got list"),
    ({"trained": "yes"}, "save_weights: trained must be True or False, got str"),
    ({"trained": 1}, "save_weights: trained must be True or False, got int"),
])  # fmt: skip
def test_save_weights_refuses_header_values_that_no_load_would_take(tmp_path, given, message) -> None:
    """``save_weights(preset=123)`` or ``trained="yes"`` wrote a file that every load refused
    ("header's 'preset' must be a preset's name or null"), as NaN weights would have been."""
    path = tmp_path / "w.safetensors"
    with pytest.raises(TypeError, match="^" + re.escape(message) + "$"):
        save_weights(CoordinateLSTM(), path, **given)
    assert not path.exists()
    save_weights(CoordinateLSTM(), path, preset="l2l-2016", trained=False)  # what it takes
    assert load_weights(path)[1]["preset"] == "l2l-2016"


def test_a_header_value_json_cannot_store_is_refused_naming_its_key_and_the_file(tmp_path) -> None:
    """``save_weights(extra={"data": Path(...)})`` (or ``trained_on=Path(...)``) raised json's bare
    "Object of type PosixPath is not JSON serializable", naming neither the key nor the file."""
    from learnedopt.meta.fewshot import FewShotLearner, LearnerSpec, save_learner

    path = tmp_path / "w.safetensors"
    spec = LearnerSpec(algo="maml", architecture={"kind": "mlp", "sizes": [1, 2, 1], "activation": "relu"},
                       loss="mse", inner_steps=1, test_inner_steps=1, inner_lr=0.1)  # fmt: skip
    for key, save in (
        ("data", lambda: save_weights(CoordinateLSTM(), path, extra={"command": "x", "data": tmp_path})),
        ("trained_on", lambda: save_weights(CoordinateLSTM(), path, trained_on=tmp_path)),
        ("data", lambda: save_learner(FewShotLearner(spec, seed=0), path, extra={"data": tmp_path})),
    ):
        with pytest.raises(TypeError, match="^" + re.escape(f"cannot write {path}: the header's {key!r} is not JSON: ")
                           + f"Object of type {type(tmp_path).__name__} is not JSON serializable$"):  # fmt: skip
            save()
        assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("rule", "preset", "kind"), [
    (CoordinateLSTM(), "meta-lstm-2017", "MetaLSTMCell"),
    (CoordinateLSTM(hidden_size=4), "l2l-2016", "CoordinateLSTM"),
    (CoordinateLSTM(), "l2l-blend", "CoordinateLSTM"),
])  # fmt: skip
def test_save_weights_refuses_a_preset_of_another_architecture_than_the_rule(tmp_path, recwarn, rule, preset, kind) -> None:
    """``save_weights(CoordinateLSTM(), path, preset="meta-lstm-2017", trained=False)`` wrote a file
    that loaded as that preset: the optimizer said it runs "CoordinateLSTM, preset meta-lstm-2017"
    and warned with the MetaLSTMCell preset's description (hidden 20) for a rule of another
    architecture."""
    path = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match="^" + re.escape(f"save_weights: preset {preset!r} is a {kind} {{")
                       + r".*\}, but the rule is a CoordinateLSTM \{.*\}: give preset=None for weights of your own$"):  # fmt: skip
        save_weights(rule, path, preset=preset, trained=False)
    assert not path.exists()
    save_weights(CoordinateLSTM(), path, preset="l2l-2016", trained=False)  # its architecture
    save_weights(CoordinateLSTM(hidden_size=4), path, preset="a-preset-of-a-later-version")
    assert load_weights(path)[1]["preset"] == "a-preset-of-a-later-version"


_LONG = "x" * 10**6


@pytest.mark.parametrize(("change", "message"), [
    ({"trained": list(range(10**5))}, r"header's 'trained' must be true or false or null, got \[0, 1, 2, .*\.\.\.\]$"),
    ({"preset": {str(i): i for i in range(10**5)}}, r"header's 'preset' must be a preset's name or null, got \{.*\.\.\.\}$"),
    ({"format": _LONG}, r"unsupported weight format 'x+\.\.\.x+' \(this library reads 1\)$"),
    ({"kind": _LONG}, r"unknown update rule kind 'x+\.\.\.x+'; known: "),
    ({"config": {_LONG: 1}}, r"invalid CoordinateLSTM config in header: unknown CoordinateLSTM config keys: \['x+.*\(1000\d\d\d characters\)$"),
    ({"config": {"hidden_size": _LONG}}, r"invalid CoordinateLSTM config in header: hidden_size must be an integer >= 1, got 'x+.*characters\)$"),
])  # fmt: skip
def test_a_header_field_far_too_long_is_refused_in_a_short_message(tmp_path, change, message) -> None:
    """A header whose 'kind' or 'format' was a string of 10**6 characters, or whose 'trained' a
    list of 10**5 entries, printed the whole value: an error of megabytes on one line (a huge
    config list was cut short already)."""
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_weights(CoordinateLSTM(), good)
    tensors = dict(load_weights(good)[0].state_dict())
    save_file(tensors, str(bad), metadata={"learnedopt": json.dumps({**read_header(good), **change})})
    with pytest.raises(ValueError) as caught:
        load_weights(bad)
    text = str(caught.value)
    assert len(text) < 1000, text[:200]  # before the pattern, which would take long over megabytes
    assert re.search("^" + re.escape(f"{bad}: ") + ".*" + message, text), text


def test_building_a_rule_leaves_another_threads_default_dtype_alone(tmp_path, monkeypatch) -> None:
    """Rules were built in float32 by setting torch's default dtype (global, not per thread) for
    the while: in a float64 program, a tensor another thread made meanwhile (``torch.zeros(2)``)
    came out float32. Here the other thread makes one while the rule is being constructed."""
    from learnedopt.weights import average_weights, fingerprint

    for i in range(2):
        save_weights(CoordinateLSTM(hidden_size=4), tmp_path / f"{i}.safetensors")
    expected = {name: fingerprint(build_preset(name)[0])["sha256"] for name in ("l2l-2016", "meta-lstm-2017", "meta-lstm-adam")}
    made: list[torch.dtype] = []

    _run_in_another_thread_while_building_rules(monkeypatch, lambda: made.append(torch.zeros(2).dtype))
    calls = {
        "load_weights(l2l-blend)": lambda: load_weights("l2l-blend"),
        "load_weights(file)": lambda: load_weights(tmp_path / "0.safetensors"),
        "average_weights": lambda: average_weights([tmp_path / "0.safetensors", tmp_path / "1.safetensors"]),
        **{f"build_preset({name})": (lambda name=name: build_preset(name)) for name in expected},
    }
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for name, call in calls.items():
            made.clear()
            rule = call()[0]
            assert made and set(made) == {torch.float64}, name
            assert {v.dtype for v in rule.state_dict().values()} == {torch.float32}, name
            if name.startswith("build_preset"):  # the same weights as in a float32 program
                assert fingerprint(rule)["sha256"] == expected[name.removeprefix("build_preset(")[:-1]], name
    finally:
        torch.set_default_dtype(previous)


def test_a_file_name_as_long_as_the_file_system_takes_is_written(tmp_path) -> None:
    """A legal name within 4 bytes of the file system's longest (255 bytes here) failed to save:
    its temporary file ``<name>.tmp`` was too long, and the error named that file, not the one
    asked for. The temporary file of such a name is a short one (as unique, evaluation records')."""
    import os

    from learnedopt.files import write_atomically

    try:
        most = os.pathconf(tmp_path, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        pytest.skip("no limit on a file name's length to be read here")
    path = tmp_path / ("w" * (most - len(".safetensors")) + ".safetensors")
    save_weights(CoordinateLSTM(hidden_size=3), path)
    assert load_weights(path)[0].config.hidden_size == 3
    write_atomically(path, lambda tmp: tmp.write_bytes(b"x"), unique=True)
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and path.read_bytes() == b"x"
