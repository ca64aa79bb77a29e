// fastdistill._simt: the CUDA kernels compiled for the CPU SIMT emulator, registered as test-only ops
// (torch.ops.fastdistill_simt.*) by the other files of this directory. This file only gives the shared
// library a Python module entry point so that `import fastdistill._simt` loads (and registers) it.
#include <Python.h>

static struct PyModuleDef fastdistill_simt_module = {PyModuleDef_HEAD_INIT, "_simt",
                                                     "CUDA kernels on the CPU SIMT emulator (tests only)", -1,
                                                     nullptr};

PyMODINIT_FUNC PyInit__simt(void) { return PyModule_Create(&fastdistill_simt_module); }
