"""A group's experts for a new placement version, built beside the ones it serves.

Experts the group keeps are copied from the tensors it holds; only the experts it gains are read
from the checkpoint. The copies make the new version independent of the old one, which is freed
as a whole once no attention replica uses it: for a while the group holds both (at most twice its
expert memory; the README says so). `LayerBuild` splits one MoE layer's share into one copy per
expert, so a server can interleave the build with the requests it serves (serving/expert_group.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from glm_ray.experts.local import ExpertWeights


def missing(held: dict[int, ExpertWeights], want: Sequence[int]) -> list[int]:
    """The experts of `want` that `held` does not have: what must be read."""
    have = set(next(iter(held.values())).expert_ids)
    return sorted(int(e) for e in set(want) if int(e) not in have)


class LayerBuild:
    """One layer's ExpertWeights holding `want` (ascending), filled one expert per `step()`: from
    `old` where it has the expert, else from `loaded` (ExpertWeights), else read by `read(expert,
    w13 row, w2 row)` (loader.ExpertReader.read_into for this layer)."""

    def __init__(self, old: ExpertWeights, loaded: ExpertWeights | None, want: Sequence[int], read=None):
        self.want = sorted(int(e) for e in want)
        have = set(old.expert_ids)
        self.sources = []
        for e in self.want:
            source = old if e in have else loaded
            if (source is None or source.slot[e] < 0) and read is None:
                raise ValueError(f"expert {e} is neither held nor among the experts read")
            self.sources.append(source if source is not None and source.slot[e] >= 0 else None)
        self.read = read
        n = len(self.want)
        self.w13 = old.w13.new_empty((n, *old.w13.shape[1:]))
        self.w2 = old.w2.new_empty((n, *old.w2.shape[1:]))
        self.num_experts = old.slot.numel()
        self.compute_dtype = old.compute_dtype
        self.done = 0

    def step(self) -> bool:
        """Copy the next expert; False once every slot is filled."""
        if self.done == len(self.want):
            return False
        e, source = self.want[self.done], self.sources[self.done]
        if source is None:
            self.read(e, self.w13[self.done], self.w2[self.done])
        else:
            slot = int(source.slot[e])
            self.w13[self.done].copy_(source.w13[slot])
            self.w2[self.done].copy_(source.w2[slot])
        self.done += 1
        return self.done < len(self.want)

    def result(self) -> ExpertWeights:
        if self.done != len(self.want):
            raise RuntimeError(f"layer build at {self.done} of {len(self.want)} experts")
        return ExpertWeights(self.want, self.w13, self.w2, num_experts=self.num_experts,
                             compute_dtype=self.compute_dtype).to_slots_on(self.w13.device)


def assemble_layer(old: ExpertWeights, loaded: ExpertWeights | None, want: Sequence[int]) -> ExpertWeights:
    """One layer's ExpertWeights holding `want` (ascending), all at once."""
    build = LayerBuild(old, loaded, want)
    while build.step():
        pass
    return build.result()


def assemble(held: dict[int, ExpertWeights], want: Sequence[int],
             load_missing: Callable[[list[int]], dict[int, ExpertWeights]]) -> dict[int, ExpertWeights]:
    """{MoE layer: ExpertWeights holding `want`}, from `held` where it has them, the rest read by `load_missing`."""
    gained = missing(held, want)
    loaded = load_missing(gained) if gained else {}
    out = {}
    for layer, old in held.items():
        if gained and layer not in loaded:
            raise ValueError(f"loading experts {gained}: MoE layer {layer} is missing from what was read")
        out[layer] = assemble_layer(old, loaded.get(layer), want)
    return out
