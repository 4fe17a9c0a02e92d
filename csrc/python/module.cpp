// lispetorch._C: loading this module loads liblispetorch, whose static initialisers register the operators
// (torch.ops.lispetorch.*). The binding itself defines nothing.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "lispetorch native core (operators are under torch.ops.lispetorch)";
}
