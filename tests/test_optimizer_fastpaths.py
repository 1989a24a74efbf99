"""Property tests: shared rule calls (``group_batch_limit``) against one call per group, and the
flat state's ``is_current`` fast path against the slow path, under what a user may do between
steps (new param groups, saved and loaded states, replaced or deleted states, moved or
re-stored parameters)."""

import torch
from helpers import OPTIMIZERS, assert_same_params_and_states, step
from hypothesis import given, settings
from hypothesis import strategies as st

OPTIONS = st.fixed_dictionaries(
    {
        "lr": st.sampled_from([0.0, 0.3, 1.0]),
        "maximize": st.booleans(),
        "weight_decay": st.sampled_from([0.0, 0.1]),
        "state_dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
        "nan_policy": st.sampled_from(["raise", "skip"]),
    }
)
#: what a user may do to a parameter or its states between steps
TOUCHES = [
    "new_dict", "replace_h", "copy_into", "del_state", "del_h", "swap", "move", "reverse", "data_clone", "set_", "resize",
    "clear", "state_dtype", "maximize", "lr", "shuffle", "set_h",
]
#: parameters: (size, dtype); a float16 or bfloat16 one computes in float32 (a float32 one's partition)
SIZES = st.lists(
    st.tuples(st.integers(0, 40), st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float64])),
    min_size=1,
    max_size=3,
)
ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("step"), st.integers(0, 2**16), st.booleans(), st.booleans()),
        st.tuples(st.just("add_group"), SIZES, OPTIONS),
        st.tuples(st.just("grow"), st.integers(0, 10), st.tuples(st.integers(30, 90), st.just(torch.float32))),
        st.just(("reload",)),
        st.tuples(st.sampled_from(TOUCHES), st.integers(0, 50), st.integers(0, 50)),
    ),
    min_size=2,
    max_size=8,
)


def _param(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)


class Twin:
    """The same optimizer thrice: with ``group_batch_limit`` ``limit``, with 0, and with
    ``limit`` on the slow path (its flat buffers dropped before each step, so that every step
    rebuilds them from ``optimizer.state``)."""

    def __init__(self, kind: str, groups: list[tuple[list[tuple[int, torch.dtype]], dict]], limit: int) -> None:
        self.kind = kind
        self.params: list[list[torch.Tensor]] = [[], [], []]
        self.errors: list[str | None] = [None, None, None]
        self.opts = []
        for side in range(3):
            made = [{"params": [self._new(side, n) for n in sizes], **options} for sizes, options in groups]
            opt = OPTIMIZERS[kind](made)
            opt.chunk = 29
            opt.group_batch_limit = 0 if side == 1 else limit
            self.opts.append(opt)

    def _new(self, side: int, spec: tuple[int, torch.dtype]) -> torch.Tensor:
        p = _param(*spec, len(self.params[side]))
        self.params[side].append(p)
        return p

    def act(self, action: tuple) -> None:
        for side, opt in enumerate(self.opts):
            ps = self.params[side]
            if action[0] == "step":
                _, seed, missing, nan = action
                g = torch.Generator().manual_seed(seed)
                for i, p in enumerate(ps):
                    p.grad = None if missing and i % 3 == seed % 3 else torch.randn(p.shape, generator=g).to(p.dtype)
                if nan:
                    skipping = [p for group in opt.param_groups if group["nan_policy"] == "skip" for p in group["params"]]
                    if skipping and skipping[seed % len(skipping)].grad is not None and skipping[seed % len(skipping)].numel():
                        skipping[seed % len(skipping)].grad[0] = float("nan")
                raising = {id(p) for group in opt.param_groups if group["nan_policy"] == "raise" for p in group["params"]}
                assert not any(id(p) in raising and p.grad is not None and not p.grad.isfinite().all() for p in ps)
                if side == 2:
                    opt._flat_states.clear()
                self.attempt(side, lambda opt=opt, seed=seed: step(opt, 0.5 + seed % 7))
            elif action[0] == "add_group":
                _, sizes, options = action
                opt.add_param_group({"params": [self._new(side, n) for n in sizes], **options})
            elif action[0] == "grow":  # a group grows past the limit (a parameter appended to it)
                _, index, n = action
                opt.param_groups[index % len(opt.param_groups)]["params"].append(self._new(side, n))
            elif action[0] == "reload":
                fresh = OPTIMIZERS[self.kind]([{k: v for k, v in group.items()} for group in opt.param_groups])
                fresh.chunk, fresh.group_batch_limit = opt.chunk, opt.group_batch_limit
                self.attempt(side, lambda fresh=fresh, opt=opt: fresh.load_state_dict(opt.state_dict()))
                self.opts[side] = fresh
            else:
                self.touch(side, opt, *action)

    def attempt(self, side: int, call) -> None:
        """``call()``; a ValueError it raises (a state that no longer fits its parameter) is noted,
        as every side must raise it."""
        try:
            call()
        except ValueError as err:
            self.errors[side] = str(err)
        else:
            self.errors[side] = None

    def touch(self, side: int, opt, what: str, a: int, b: int) -> None:
        ps = self.params[side]
        with_state = [p for p in ps if {"h", "c"} <= opt.state.get(p, {}).keys()]
        if what == "clear":
            opt.state.clear()
        elif what == "move":
            source = [group for group in opt.param_groups if group["params"]]
            group = source[a % len(source)]
            p = group["params"].pop(b % len(group["params"]))
            opt.param_groups[(a + b) % len(opt.param_groups)]["params"].append(p)
        elif what == "reverse":
            opt.param_groups.reverse()
        elif what == "shuffle":  # a group's parameters in another order
            group = opt.param_groups[a % len(opt.param_groups)]
            group["params"] = group["params"][b % 3 :] + group["params"][: b % 3]
        elif what in ("state_dtype", "maximize", "lr"):
            group = opt.param_groups[a % len(opt.param_groups)]
            group[what] = {
                "state_dtype": [torch.float32, torch.bfloat16, torch.float16][b % 3], "maximize": b % 2 == 0, "lr": b / 50
            }[what]
        elif what in ("data_clone", "set_", "resize"):
            p = ps[a % len(ps)]
            if what == "data_clone":
                p.data = p.data.clone()
            elif what == "resize":
                p.data = torch.ones(p.numel() + 1 + b % 3, dtype=p.dtype)
            else:
                with torch.no_grad():
                    p.set_(p.detach().clone())
        elif with_state:
            p = with_state[a % len(with_state)]
            state = opt.state[p]
            if what == "new_dict":
                opt.state[p] = {k: v.clone() for k, v in state.items()}
            elif what == "replace_h":
                state["h"] = torch.full_like(state["h"], 0.25 + b)
            elif what == "set_h":  # the state tensor itself given new storage
                state["h"].set_(torch.full_like(state["h"], 0.75 - b))
            elif what == "copy_into":
                state["c"].copy_(torch.full_like(state["c"], -0.5 - b))
            elif what == "del_state":
                del opt.state[p]
            elif what == "del_h":
                del state["h"]
            elif what == "swap":  # two parameters' state dicts exchanged
                q = with_state[b % len(with_state)]
                opt.state[p], opt.state[q] = opt.state[q], opt.state[p]

    def check(self) -> bool:
        """Whether the sides agree on having raised (they must), and False where they did."""
        assert self.errors[1:] == self.errors[:-1]
        if self.errors[0] is not None:
            return False
        for side in (1, 2):
            assert_same_params_and_states(self.params[0], self.opts[0], self.params[side], self.opts[side])
        return True


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(["lstm", "meta"]),
    groups=st.lists(st.tuples(SIZES, OPTIONS), min_size=1, max_size=5),
    limit=st.sampled_from([30, 100, 2048]),
    actions=ACTIONS,
)
def test_shared_calls_and_fast_path_step_as_one_call_per_group_and_slow_path(kind, groups, limit, actions) -> None:
    """Random param groups (lr, maximize, weight decay, state dtype, NaN policy each), steps with
    missing and NaN gradients, new and growing groups, saved and loaded states, and a user's
    changes to states and parameters between steps: the same bits with shared rule calls as with
    one call per group, and with the flat buffers kept as rebuilt at each step."""
    twin = Twin(kind, groups, limit)
    for action in [("step", 1, False, False), *actions, ("step", 2, True, True)]:
        twin.act(action)
        if not twin.check():
            break
