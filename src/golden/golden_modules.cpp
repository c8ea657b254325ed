#include "golden/golden.h"

namespace colt5 {
namespace golden {

bool run_module_case(const Case&, Run&) { return false; }

}  // namespace golden
}  // namespace colt5
