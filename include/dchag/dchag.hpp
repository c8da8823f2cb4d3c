#pragma once
/// Everything dchag offers. The distributed engine needs MPI and is included when dchag was
/// configured with it (the dchag::dchag target defines DCHAG_ENABLE_MPI).
#include <dchag/aggregate.hpp>
#include <dchag/channel_map.hpp>
#include <dchag/check.hpp>
#include <dchag/memory.hpp>
#include <dchag/optimizer.hpp>
#include <dchag/safetensors.hpp>
#include <dchag/weights.hpp>
#ifdef DCHAG_ENABLE_MPI
#include <dchag/communicator.hpp>
#include <dchag/device.hpp>
#include <dchag/distributed.hpp>
#include <dchag/distributed_weights.hpp>
#endif
