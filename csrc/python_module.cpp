// The Python module matnet._C. Importing it runs the static TORCH_LIBRARY registrations of the other
// translation units; the ops are then reached through torch.ops.matnet.*, so the module itself is empty.
#include <Python.h>

static struct PyModuleDef matnet_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "matnet's C++/CUDA kernels, registered as torch.ops.matnet.*", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&matnet_c_module); }
