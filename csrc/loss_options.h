// The cross-entropy option block: every cross-entropy operator's schema ends with these arguments,
// in the order softmax_ext/ops.py (LossOptions) gives them. The autograd nodes pass the block to
// the kernels whole, as IValues; each side reads what it needs here, by name. A new option is a
// field of LossOptions in ops.py, a field and a line of set() below, and its use in the kernels.
#pragma once

#include <ATen/core/Reduction.h>
#include <ATen/core/function_schema.h>
#include <ATen/core/ivalue.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <string>

namespace sme {

struct LossOptions {
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  int64_t reduction = at::Reduction::Mean;  // applied by the autograd nodes; kernels ignore it
  // The z-loss weight: added in Python from the log-sum-exp output; nonzero keeps the nodes' loss
  // in the accumulation dtype. Kernels ignore it.
  double lse_square_scale = 0.0;
  // Logit soft-capping: > 0 means the logits are cap * tanh(x / cap) inside the kernels; 0 is off.
  double softcap = 0.0;

  // Arguments [first, last) of an operator call, named by its schema.
  static LossOptions read(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> args,
                          size_t first, size_t last) {
    LossOptions o;
    for (size_t i = first; i < last; ++i) o.set(schema.arguments()[i].name(), args[i]);
    return o;
  }

  bool with_smooth() const { return label_smoothing > 0.0; }

 private:
  void set(const std::string& name, const c10::IValue& v) {
    if (name == "ignore_index")
      ignore_index = v.toInt();
    else if (name == "label_smoothing")
      label_smoothing = v.toDouble();
    else if (name == "reduction")
      reduction = v.toInt();
    else if (name == "lse_square_scale")
      lse_square_scale = v.toDouble();
    else if (name == "softcap")
      softcap = v.toDouble();
    else
      TORCH_CHECK(false, "softmax_ext: unknown loss option '", name,
                  "': softmax_ext/ops.py and csrc/loss_options.h disagree");
  }
};

}  // namespace sme
