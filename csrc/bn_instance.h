/* One instance of the kernels: the element type T, its same-width integer ivec_t and the name
 * suffix SFX(name) are defined by the includer (bnlab_kernels.c) and undefined here. */
#include "bn_impl.h"
#include "bn_masked.h" /* uses bn_impl.h's vectors, undefined by bn_impl_bwd.h */
#include "bn_impl_bwd.h"
#include "bn_drivers.h"
#undef SFX
#undef T
#undef ivec_t
