// The CUDA kernels of the moca::cuda backend, compiled once for float and double.
#include "moca/backend/cuda/instantiate.cuh"
