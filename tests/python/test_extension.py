"""The extension's own hygiene: it exports none of the symbols that its static archives bring
(the library, cudart_static, libstdc++ where the toolchain links it statically). Exported, the
dynamic linker binds them to the process's copies (PyTorch loads libstdc++ globally): on the
H100 image a static libstdc++ of GCC 13 half-bound to the system's GCC 14 one crashed in
std::ostream << long (the locale facet ids of two runtimes)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import omnimoe


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None,
                    reason="needs Linux and nm (binutils)")
def test_extension_exports_no_symbol_of_its_static_archives():
    out = subprocess.run(["nm", "-D", "--defined-only", "--demangle", omnimoe._omnimoe.__file__],
                         capture_output=True, text=True, check=True).stdout
    names = [line.split(maxsplit=2)[2] for line in out.splitlines() if len(line.split()) >= 3]
    assert "PyInit__omnimoe" in names
    leaked = [n for n in names
              if n.startswith(("omnimoe::", "cub::", "cuda", "__cuda", "std::locale",
                               "std::basic_ostream", "std::__cxx11::basic_ostringstream",
                               "__cxa_throw", "__gxx_personality"))]
    assert not leaked, f"{len(leaked)} symbols of static archives exported, e.g. {leaked[:5]}"


def test_integer_in_an_error_message_after_cuda_initialisation():
    """The crash's path: CUDA initialised (where there is a GPU), then an error whose message
    formats an integer through std::ostream, raised by the library and by the binding."""
    import torch

    from omnimoe import _omnimoe as ext

    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")
    omnimoe.cuda_available()
    with pytest.raises(omnimoe.Error, match=r"top_k must be in \[1, N = 16\], got 17"):
        ext.layer_config(8, 4, 4, 17)
    cfg = ext.layer_config(8, 4, 4, 2, 6, router_norm="none")
    dl = torch.utils.dlpack.to_dlpack
    x, w, e, m = torch.rand(5, 8), torch.rand(4, 8), torch.rand(16, 8), torch.rand(6, 8)
    b = torch.zeros(0, dtype=torch.uint8)
    with pytest.raises(omnimoe.Error, match=r"intermediate size is 6 so gate_proj, up_proj and "
                                            r"down_proj weights are all required"):
        ext.layer_forward(cfg, dl(x), dl(w), dl(w.clone()), dl(e), dl(e.clone()), dl(m), None,
                          dl(torch.rand(8, 6)), None, None, None, None, False,
                          dl(torch.empty(5, 8)), dl(b), dl(b.clone()))
