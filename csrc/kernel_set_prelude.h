// What the kernel sets use from outside csrc/, included by each kernels_<isa>.cpp before its
// `#pragma GCC target` so that all of it is compiled for the baseline ISA (kernel_set_body.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernel_set.h"
