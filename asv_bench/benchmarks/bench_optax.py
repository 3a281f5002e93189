"""fisheropt.optax on CPU (airspeed velocity): the jitted FAdam transformation against
optax.adamw and against fisheropt's numba FAdam, in one process, as ratios (issue 17).

``TrackOptax`` measures, for a 147-tensor GPT-2-small-like model as a pytree (the shapes of
``fisheropt.bench_ceiling.transformer_shapes``; "17M": d = 320, 17.4 M parameters; "many": d = 768,
91.3 M), in ONE process, timed round-robin (``bench_ceiling.interleaved_medians``):

* ``foo.fadam`` and ``optax.adamw`` as one ``jax.jit``-ed train-step tail
  (``tx.update`` + ``optax.apply_updates``, params and state donated, so XLA updates in place);
* ``fo.FAdam(backend="numba")`` on NumPy copies of the same arrays;
* :func:`plain_fadam`, FAdam as a user would write it in ~25 lines of optax (float32 sums, no
  ε_t guards, no float64 scalars): what the spec's numerics cost under XLA;
* the in-process ceiling ``a += 0*b`` (numba) over the same params and gradients.

GB/s counts the bytes the spec's fused schedule moves (``Rule.items_per_element``: FAdam 10
items = 40 B per float32 element, AdamW 7 = 28 B), whatever an implementation actually moves,
so a ratio below 1 is traffic left on the table or time spent elsewhere. Tracked:

* ``track_fadam_ratio_to_ceiling``: GB/s of the jitted ``foo.fadam`` / GB/s of ``a += 0*b``;
* ``track_fadam_speed_vs_numba``: numba FAdam time / jitted ``foo.fadam`` time (> 1: JAX faster);
* ``track_fadam_time_vs_optax_adamw``: jitted ``foo.fadam`` time / jitted ``optax.adamw`` time;
* ``track_fadam_hlo_passes`` / ``track_adamw_hlo_passes``: instructions of the compiled HLO's
  entry computation that read or write the embedding (the largest tensor): passes over it.

Without jax/optax or numba the benchmarks raise NotImplementedError (asv: skipped). By hand::

    cd asv_bench && python -m benchmarks.bench_optax [17M|many] [repeats]
"""

from __future__ import annotations

import gc
import math
import re
import sys

import numpy as np

from . import _common as C
from ._common import bench_ceiling

SIZES = ["17M", "many"]
D_MODEL = {"17M": 320, "many": 768}
REPEATS = 7


def _require():
    try:
        import jax  # noqa: F401
        import optax  # noqa: F401

        import fisheropt.optax  # noqa: F401
    except ImportError as exc:
        raise NotImplementedError(f"needs jax and optax (pip install 'fisheropt[jax]'): {exc}") from exc
    import fisheropt as fo

    if "numba" not in fo.backends.available():
        raise NotImplementedError("needs the numba backend")


def shapes_for(size: str):
    return bench_ceiling.transformer_shapes(d=D_MODEL[size])


# ---- compiled HLO -------------------------------------------------------------------------------
_INSTR = re.compile(r"^\s*(ROOT\s+)?(%[\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")


def hlo_passes(text: str, shape: tuple) -> dict:
    """Passes of a compiled module over arrays of ``shape``: the entry computation's instructions
    (fusions, custom calls, copies, ...) that read or write one, with the bytes they move there.
    Parameters, tuples and get-tuple-element are bookkeeping, not passes."""
    dims = ",".join(str(s) for s in shape)
    pattern = re.compile(r"f32\[" + re.escape(dims) + r"\]")
    entry = text[text.index("\nENTRY") :]
    body = entry[entry.index("{") + 1 :]
    shapes, passes, moved = {}, [], 0
    for line in body.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        _, name, out_shape, op, rest = m.groups()
        shapes[name] = out_shape
        if op in ("parameter", "tuple", "get-tuple-element", "constant", "bitcast", "conditional"):
            continue  # (a conditional's branch runs only when taken: fisheropt.optax's rescue sums)
        operands = re.findall(r"%[\w.\-]+", rest.split("),")[0] if ")," in rest else rest)
        reads = sum(1 for o in operands if pattern.search(shapes.get(o, "")))
        writes = len(pattern.findall(out_shape))
        if reads or writes:
            passes.append((name, op, reads, writes))
            moved += (reads + writes) * 4
    return {"passes": len(passes), "bytes_per_element": moved, "detail": passes}


def plain_fadam(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, eps2=0.01, clip=1.0, p=0.5, weight_decay=0.1):
    """FAdam as a plain optax transformation (float32 everywhere, the paper's formulas, no guards):
    the comparison point for the cost of fisheropt.optax's conformance to the spec."""
    import jax
    import jax.numpy as jnp
    import optax

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731  (two buffers: both donated)
        return (jnp.zeros([], jnp.int32), zeros(), zeros())

    def update(grads, state, params):
        count, m, f = state
        t = (count + 1).astype(jnp.float32)
        b2h = b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)
        rms = lambda x: jnp.sqrt(jnp.mean(x * x))  # noqa: E731

        def leaf(g, th, m_, f_):
            f_ = b2h * f_ + (1 - b2h) * g * g
            d = f_**p + jnp.minimum(eps, eps2 * rms(g)) ** (2 * p)
            gb = g / d
            gb = gb / jnp.maximum(1.0, rms(gb) / clip)
            m_ = b1 * m_ + (1 - b1) * gb
            wb = th / d
            wb = wb / jnp.maximum(1.0, rms(wb) / clip)
            return -learning_rate * (m_ + weight_decay * wb), m_, f_

        out = jax.tree.map(leaf, grads, params, m, f)
        pick = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=lambda x: isinstance(x, tuple))  # noqa: E731
        return pick(0), (optax.safe_increment(count), pick(1), pick(2))

    return optax.GradientTransformation(init, update)


# ---- measurement --------------------------------------------------------------------------------
def measure(size: str, repeats: int = REPEATS, seed: int = 0) -> dict:
    """Everything of one size in one process: seconds per step, GB/s, ratios, HLO passes."""
    _require()
    import jax
    import jax.numpy as jnp
    import optax

    import fisheropt as fo
    import fisheropt.optax as foo
    from fisheropt.refimpl import RULES

    shapes = shapes_for(size)
    n = sum(math.prod(s) for s in shapes)
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32) * np.float32(1e-3) for s in shapes]

    class Jitted:
        """One jitted update + apply_updates with params and state donated (XLA writes in place)."""

        def __init__(self, tx):
            def step(p, s, g):
                updates, s = tx.update(g, s, p)
                return optax.apply_updates(p, updates), s

            self.fn = jax.jit(step, donate_argnums=(0, 1))
            self.p = [jnp.asarray(x) for x in params]
            self.g = [jnp.asarray(x) for x in grads]
            self.s = tx.init(self.p)
            self.text = self.fn.lower(self.p, self.s, self.g).compile().as_text()
            self()

        def __call__(self):
            self.p, self.s = self.fn(self.p, self.s, self.g)
            jax.block_until_ready(self.p)

    fadam = Jitted(foo.fadam())
    adamw = Jitted(optax.adamw(1e-3))
    plain = Jitted(plain_fadam())
    opt = fo.FAdam([p.copy() for p in params], backend="numba", check_finite=False)
    opt.step(grads)
    ceiling, ceil_bytes = bench_ceiling.ceiling_on(opt.params, grads)
    t = bench_ceiling.interleaved_medians(
        {
            "ceiling": ceiling,
            "numba": lambda: opt.step(grads),
            "jax_fadam": fadam,
            "optax_adamw": adamw,
            "plain_fadam": plain,
        },
        repeats=repeats,
    )
    fadam_bytes = RULES["fadam"].items_per_element * 4 * n
    adamw_bytes = RULES["adamw"].items_per_element * 4 * n
    ceil_gbs = ceil_bytes / t["ceiling"] / 1e9
    big = max(shapes, key=math.prod)
    out = {
        "size": size,
        "tensors": len(shapes),
        "parameters": n,
        "seconds": t,
        "ceiling_gbs": ceil_gbs,
        "jax_fadam_gbs": fadam_bytes / t["jax_fadam"] / 1e9,
        "numba_fadam_gbs": fadam_bytes / t["numba"] / 1e9,
        "optax_adamw_gbs": adamw_bytes / t["optax_adamw"] / 1e9,
        "plain_fadam_gbs": fadam_bytes / t["plain_fadam"] / 1e9,
        "fadam_hlo": hlo_passes(fadam.text, big),
        "adamw_hlo": hlo_passes(adamw.text, big),
        "plain_fadam_hlo": hlo_passes(plain.text, big),
    }
    out["fadam_ratio_to_ceiling"] = out["jax_fadam_gbs"] / ceil_gbs
    out["numba_ratio_to_ceiling"] = out["numba_fadam_gbs"] / ceil_gbs
    out["adamw_ratio_to_ceiling"] = out["optax_adamw_gbs"] / ceil_gbs
    out["fadam_speed_vs_numba"] = t["numba"] / t["jax_fadam"]
    out["fadam_time_vs_optax_adamw"] = t["jax_fadam"] / t["optax_adamw"]
    out["fadam_time_vs_plain_fadam"] = t["jax_fadam"] / t["plain_fadam"]
    out["fadam_hlo_passes"] = float(out["fadam_hlo"]["passes"])
    out["adamw_hlo_passes"] = float(out["adamw_hlo"]["passes"])
    del fadam, adamw, plain
    gc.collect()
    return out


class TrackOptax:
    params = (SIZES,)
    param_names = ["size"]
    timeout = 3600

    def setup_cache(self):
        _require()
        return {size: measure(size) for size in SIZES}

    track_fadam_ratio_to_ceiling = C.tracked("fadam_ratio_to_ceiling", "fraction of a += 0*b")
    track_fadam_gbs = C.tracked("jax_fadam_gbs", "GB/s")
    track_fadam_speed_vs_numba = C.tracked("fadam_speed_vs_numba", "numba time / jax time")
    track_fadam_time_vs_optax_adamw = C.tracked("fadam_time_vs_optax_adamw", "foo.fadam time / optax.adamw time")
    track_fadam_time_vs_plain_fadam = C.tracked("fadam_time_vs_plain_fadam", "foo.fadam time / plain optax FAdam time")
    track_fadam_hlo_passes = C.tracked("fadam_hlo_passes", "passes over the embedding")
    track_adamw_hlo_passes = C.tracked("adamw_hlo_passes", "passes over the embedding")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    size = argv[0] if argv else "17M"
    repeats = int(argv[1]) if len(argv) > 1 else REPEATS
    r = measure(size, repeats)
    print(f"{r['tensors']} tensors, {r['parameters'] / 1e6:.1f} M float32 parameters, median of {repeats}")
    for key, label in (
        ("ceiling", "a += 0*b (numba)"),
        ("numba", "fo.FAdam numba"),
        ("jax_fadam", "jit foo.fadam"),
        ("optax_adamw", "jit optax.adamw"),
        ("plain_fadam", "jit plain_fadam"),
    ):
        print(f"  {label:20s} {r['seconds'][key] * 1e3:8.1f} ms")
    print(
        f"  ceiling {r['ceiling_gbs']:.2f} GB/s; GB/s (spec bytes) / ratio to ceiling: "
        f"foo.fadam {r['jax_fadam_gbs']:.2f} / {r['fadam_ratio_to_ceiling']:.3f}, "
        f"numba FAdam {r['numba_fadam_gbs']:.2f} / {r['numba_ratio_to_ceiling']:.3f}, "
        f"optax.adamw {r['optax_adamw_gbs']:.2f} / {r['adamw_ratio_to_ceiling']:.3f}, "
        f"plain_fadam {r['plain_fadam_gbs']:.2f}"
    )
    print(
        f"  numba time / foo.fadam time {r['fadam_speed_vs_numba']:.3f}; "
        f"foo.fadam time / optax.adamw time {r['fadam_time_vs_optax_adamw']:.3f}; "
        f"foo.fadam time / plain_fadam time {r['fadam_time_vs_plain_fadam']:.3f}"
    )
    for key in ("fadam_hlo", "plain_fadam_hlo", "adamw_hlo"):
        h = r[key]
        print(f"  {key}: {h['passes']} passes over the embedding, {h['bytes_per_element']} B per element")
        for name, op, reads, writes in h["detail"]:
            print(f"     {name:34s} {op:12s} reads {reads} writes {writes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
