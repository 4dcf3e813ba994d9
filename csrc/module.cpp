// Entry point of pec_kernels._C.
//
// Every kernel file registers its ops itself with TORCH_LIBRARY_FRAGMENT(pec, m) and
// TORCH_LIBRARY_IMPL(pec, CUDA, m), so they appear as torch.ops.pec.<name>: dispatchable,
// CUDA-graph capturable and visible to torch.compile. This file only defines the library and
// gives Python a module to import, which loads the shared object and runs those registrations.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pec, m) {}

static struct PyModuleDef pec_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pec_c_module); }
