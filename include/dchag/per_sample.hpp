#pragma once
/// What a front end's forward takes per sample besides the images.
#include <dchag/attention_state.hpp>
#include <dchag/tensor.hpp>

namespace dchag {

/// Per-sample inputs of a forward. Every field may be left empty.
template <class Scalar, class MemSpace>
struct PerSample {
  /// [B] lead time of every sample in hours (FrontEndConfig::lead_time; required with it,
  /// refused without it).
  View1<const Scalar, MemSpace> lead_times = {};
  /// [B, C] over the model's channel ids (DESIGN 3.10): 1 where channel c holds data in sample b,
  /// 0 where it is missing; empty: every channel is valid. A missing channel gets no weight in
  /// any softmax and adds nothing to a linear sum; a D-CHAG rank with no valid channel in a sample
  /// contributes no partial token to it. Every sample needs one valid channel among those the
  /// forward reads. Missing channels' pixels are ignored but must be finite. Keep the mask
  /// unchanged until the backward has run; under MPI it must be the same on every rank.
  InputMask<MemSpace> mask = {};
};

}  // namespace dchag
