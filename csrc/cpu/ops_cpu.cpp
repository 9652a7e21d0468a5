// The CPU implementations of the did_engine ops, registered for the CPU dispatch key
// under the schemas of csrc/ops.cpp. The kernels are in csrc/cpu/<op>.cpp.

#include <torch/library.h>

#include "cpu/ops_cpu.h"

namespace did_engine {

TORCH_LIBRARY_IMPL(did_engine, CPU, m) {
  m.impl("block_decode_attention", &block_decode_attention_cpu);
  m.impl("kv_commit", &kv_commit_cpu);
  m.impl("block_causal_attention", &block_causal_attention_cpu);
  m.impl("snapshot_remask", &snapshot_remask_cpu);
}

}  // namespace did_engine
