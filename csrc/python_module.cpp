// `import did_engine._C` only needs a module object: the ops register themselves through
// static initialisers when the shared library is loaded. Kept apart from the op registry so
// the CMake build (no Python) compiles everything else unchanged.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
