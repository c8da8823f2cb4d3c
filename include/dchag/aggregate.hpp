#pragma once
/// The entry most users include: the front ends (flat ClimaX, D-CHAG on one process) and their
/// building blocks (tokenizer, cross-attention, partial aggregation, positional embedding).
#include <dchag/config.hpp>
#include <dchag/cross_attention.hpp>
#include <dchag/error.hpp>
#include <dchag/front_end.hpp>
#include <dchag/lead_time_embedding.hpp>
#include <dchag/linear_aggregation.hpp>
#include <dchag/partial_aggregator.hpp>
#include <dchag/per_sample.hpp>
#include <dchag/positional_embedding.hpp>
#include <dchag/precision.hpp>
#include <dchag/tensor.hpp>
#include <dchag/tokenizer.hpp>
#include <dchag/weights.hpp>
