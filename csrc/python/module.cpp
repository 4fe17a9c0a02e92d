// lispetorch._C: loading this module loads liblispetorch, whose static initialisers register the operators
// (torch.ops.lispetorch.*). The binding itself only reports how the library was built.
#include <pybind11/pybind11.h>

#include <torch/version.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "lispetorch native core (operators are under torch.ops.lispetorch)";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["torch_version"] = TORCH_VERSION;
#ifdef LISPETORCH_WITH_CUDA
        info["cuda"] = true;
#else
        info["cuda"] = false;
#endif
        return info;
      },
      "The torch version the extension was compiled against, and whether it was compiled with CUDA.");
}
