// Precompiled for every C++ translation unit of the library, tests and tools.
#pragma once
#include <torch/torch.h>
