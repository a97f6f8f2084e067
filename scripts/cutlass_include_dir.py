"""Prints the CUTLASS/CuTe include directory of the installed nvidia-cutlass wheel (empty if it
is not installed); the shell scripts that build sm_90a code outside CMake use it."""
import importlib.util
import os

spec = importlib.util.find_spec("cutlass_library")
print(os.path.join(list(spec.submodule_search_locations)[0], "source", "include") if spec else "")
