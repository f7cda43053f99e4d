"""Standalone check that C++ errors reach Python as omnimoe.Error from each place they can be
raised: the library (with the GIL released inside layer_forward, or held in layer_config) and
the binding's own argument checks (GIL held), directly and through the torch op. One case per
process, so a crash names its case (device_check.sh runs them all and reruns a crashing one
under cuda-gdb).

    python3 tests/python/binding_error_repro.py CASE [--no-cuda-init]
    python3 tests/python/binding_error_repro.py --list
"""

from __future__ import annotations

import faulthandler
import sys

faulthandler.enable()

import torch  # noqa: E402
from torch.utils.dlpack import to_dlpack as dl  # noqa: E402

import omnimoe  # noqa: E402
from omnimoe import _omnimoe as ext  # noqa: E402

D, NR, NC, K, I, T = 8, 4, 4, 2, 6, 5


def _weights(intermediate=I, bad_down=False):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.rand(*s, generator=g) - 0.5  # noqa: E731
    n = NR * NC + (1 if bad_down else 0)
    w = dict(x=r(T, D), row=r(NR, D), col=r(NC, D), up=r(NR * NC, D), down=r(n, D))
    if intermediate:
        w.update(gate=r(intermediate, D), mup=r(intermediate, D), mdown=r(D, intermediate))
    return w


def _forward(cfg, w, mlp):
    y = torch.empty(T, D)
    saved = torch.empty(ext.layer_saved_bytes(cfg, T, "f32"), dtype=torch.uint8)
    work = torch.empty(ext.layer_forward_workspace_bytes(cfg, T, "f32"), dtype=torch.uint8)
    ext.layer_forward(cfg, dl(w["x"]), dl(w["row"]), dl(w["col"]), dl(w["up"]), dl(w["down"]),
                      *(None if t is None else dl(t) for t in mlp), None, None, None, None,
                      False, dl(y), dl(saved), dl(work), 0, 1)


def library_gil_released():
    """layer_forward's launcher rejects down_embed's shape (thrown with the GIL released)."""
    cfg = ext.layer_config(D, NR, NC, K, I, router_norm="none")
    w = _weights(bad_down=True)
    _forward(cfg, w, (w["gate"], w["mup"], w["mdown"]))


def library_gil_held():
    """LayerConfig::validate() rejects top_k (library code, GIL held)."""
    ext.layer_config(D, NR, NC, NR * NC + 1)


def binding_parse_dtype():
    """The binding's own parse_dtype() rejects a dtype name (GIL held, no arrays)."""
    cfg = ext.layer_config(D, NR, NC, K)
    ext.layer_saved_bytes(cfg, T, "i8")


def binding_layer_args():
    """The binding's layer_args() rejects a missing MLP weight (GIL held, arrays alive)."""
    cfg = ext.layer_config(D, NR, NC, K, I, router_norm="none")
    w = _weights()
    _forward(cfg, w, (w["gate"], None, w["mdown"]))


def binding_layer_args_torch_op():
    """The same error through torch.ops.omnimoe.layer_forward and autograd (the failing test)."""
    from omnimoe.torch import omnimoe_layer

    w = _weights()
    omnimoe_layer(w["x"], w["row"], w["col"], w["up"], w["down"], w["gate"], None, w["mdown"],
                  num_experts_per_token=K, router_norm="none")


CASES = {f.__name__: f for f in (library_gil_released, library_gil_held, binding_parse_dtype,
                                  binding_layer_args, binding_layer_args_torch_op)}


def main(argv):
    if "--list" in argv:
        print(" ".join(CASES))
        return 0
    name = argv[1]
    if "--no-cuda-init" not in argv:
        # What conftest.py does at import on a GPU machine: both runtimes initialise CUDA.
        print(f"cuda: torch {torch.cuda.is_available()}, omnimoe {omnimoe.cuda_available()}")
        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")
    try:
        CASES[name]()
    except omnimoe.Error as e:
        print(f"{name}: omnimoe.Error: {e}")
        return 0
    print(f"{name}: no error raised")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
