"""Seeded noise drawn exactly as diffusers draws it, so the same seed gives the same image."""
import operator

import torch


def check_seed(seed) -> int | None:
    """A seed torch takes (a whole number in [-2⁶³, 2⁶⁴)) or None, or a one-line error."""
    try:
        whole = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        whole = None
    if seed is not None and (whole is None or not -2**63 <= whole < 2**64):
        raise ValueError(f"seed={seed!r}: need a whole number in [-2⁶³, 2⁶⁴), e.g. 0")
    return whole


def generator(seed: int | None) -> torch.Generator | None:
    seed = check_seed(seed)
    return None if seed is None else torch.Generator("cpu").manual_seed(seed)


def generators(seed, n: int):
    """The generator of one seed, or for a list of n seeds one generator per batch item, so that
    item i draws exactly what it draws alone with seed[i]."""
    if not isinstance(seed, (list, tuple)):
        return generator(seed)
    if len(seed) != n:
        raise ValueError(f"seed: {len(seed)} seeds for {n} prompts; give one seed or one per "
                         "prompt")
    return [generator(s) for s in seed]


def randn_tensor(shape, generator=None, device=None, dtype=None):
    """diffusers' `randn_tensor`: drawn on the generator's device (a CPU generator draws on the CPU,
    then moves), one draw per batch item when given a list of generators."""
    device = torch.device(device or "cpu")
    gens = generator if isinstance(generator, list) else [generator]
    rand_device = gens[0].device if gens[0] is not None else device
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], device=rand_device, dtype=dtype).to(device)
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype)
                      for g in gens[:shape[0]]]).to(device)
