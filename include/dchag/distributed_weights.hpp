#pragma once
/// One weight file for a whole channel group (DESIGN 6): the collective save_weights and
/// load_weights of a distributed model.
///
/// Saving: every rank contributes its pieces; rank 0 gathers them (point-to-point messages of host
/// copies, sizes in 64 bits, runs longer than INT_MAX elements split over several messages) and
/// writes one safetensors file holding every tensor of the whole model, whole, as the
/// single-process save_weights of the equivalent model writes it: the same names, shapes and F32
/// values, and the same `channels` metadata. Tensors spread over ranks (`var_embed` rows,
/// `token_embeds.{c}.*`, `partial.{r}.*`) are assembled from their pieces; replicated tensors
/// (`final.*`, `var_agg.*`, `var_query`, `pos_embed`, and in tp_only everything) are written once,
/// from rank 0's copy. Only the tensor order may differ from a single-process file: rank 0's
/// tensors first, then those each further rank adds, in rank order (for a blocks map that is the
/// single-process order). Rank 0 holds the whole model on the host while it writes.
///
/// Loading: every rank opens the file, reads its header and then only the bytes of its own pieces
/// (safetensors::File::open), with the single-process load_weights' rules for names, shapes, dtypes
/// and channels matched by name. Each rank reads everything before any parameter changes, and the
/// ranks agree that all of them succeeded, so a load that throws leaves every rank's parameters as
/// they were.
///
/// Errors (CONTRIBUTING, Errors): both calls are collective and check before their first data
/// message. A tensor absent from the file or of another shape for any rank, a missing, truncated
/// or malformed file on any rank (loading) or on rank 0 (saving), or pieces of the ranks that do
/// not fit together (saving) throw on every rank: the rank that failed throws its exception with
/// "on rank r of P" in the message, the others a dchag::error naming that rank and its message.
#include <dchag/communicator.hpp>
#include <dchag/detail/gather_weights.hpp>
#include <dchag/distributed.hpp>
#include <dchag/init.hpp>
#include <dchag/safetensors.hpp>
#include <dchag/tensor.hpp>
#include <dchag/weights.hpp>

#include <Kokkos_Core.hpp>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace dchag {

/// Collective over `comm`: writes the file at `path` on rank 0 from the pieces of `params` on
/// every rank. The tensors named in `replicated` are the same on every rank and written from rank
/// 0's copy; every other tensor's elements must be held by exactly one rank (std::invalid_argument
/// for a malformed list on one rank, dchag::error for pieces that overlap or leave elements out).
/// `channel_names` as for the single-process save_weights, the same on every rank.
template <class Scalar, class MemSpace>
void save_weights(const Communicator& comm, const std::string& path,
                  const TensorList<Scalar, MemSpace>& params,
                  const std::vector<std::string>& replicated,
                  const std::vector<std::string>& channel_names = {}) {
  constexpr const char* where = "dchag::save_weights";
  detail::ScopedRegion region(where);
  const int rank = comm.rank(), P = comm.size();
  detail::Holding<Scalar> held;
  std::vector<unsigned char> catalog;
  comm.check_collectively(where, [&] {
    detail::naming_rank(comm, where, [&] {
      detail::check_save(where, params, channel_names);
      held = detail::hold(where, params, replicated, rank == 0);
      catalog = detail::encode_catalog(held.tensors);
    });
  });
  comm.agree(where, {{"the number of channel names", std::int64_t(channel_names.size())},
                     {"the channel names (a hash)",
                      std::int64_t(detail::hash_name(detail::join_names(channel_names)))}});

  // The catalogs go to rank 0, which checks that the pieces fit together before any value moves.
  std::int64_t bytes = std::int64_t(catalog.size());
  std::vector<std::int64_t> sizes(std::size_t(rank == 0 ? P : 1));
  DCHAG_MPI_CHECK(where, MPI_Gather, &bytes, 1, MPI_INT64_T, sizes.data(), 1, MPI_INT64_T, 0,
                  comm.comm());
  std::vector<std::vector<unsigned char>> received(std::size_t(rank == 0 ? P : 0));
  if (rank == 0) {
    for (int r = 1; r < P; ++r) {
      received[std::size_t(r)].resize(std::size_t(sizes[std::size_t(r)]));
      detail::receive_values(comm, received[std::size_t(r)].data(), sizes[std::size_t(r)], MPI_BYTE,
                             r);
    }
  } else {
    detail::send_values(comm, catalog.data(), bytes, MPI_BYTE, 0);
  }
  std::vector<detail::FileTensor<Scalar>> files;
  std::vector<std::vector<std::size_t>> index;
  std::vector<std::vector<detail::HeldTensor>> catalogs;
  comm.check_collectively(where, [&] {
    if (rank != 0) return;
    catalogs.push_back(held.tensors);
    for (int r = 1; r < P; ++r)
      catalogs.push_back(detail::decode_catalog(received[std::size_t(r)], r));
    files = detail::merge_catalogs<Scalar>(catalogs, index);
    for (auto& f : files) {
      std::int64_t n = 1;
      for (auto d : f.shape) n *= d;
      f.values.resize(std::size_t(n));
    }
  });

  // The values: rank 0 copies its own and receives every other rank's runs in catalog order.
  const MPI_Datatype type = detail::mpi_datatype<Scalar>();
  if (rank == 0) {
    for (int r = 0; r < P; ++r) {
      std::size_t at = 0;
      const auto& tensors = catalogs[std::size_t(r)];
      for (std::size_t i = 0; i < tensors.size(); ++i) {
        auto& f = files[index[std::size_t(r)][i]];
        for (const auto& run : tensors[i].runs) {
          Scalar* dst = f.values.data() + run.offset;
          if (r == 0) {
            std::copy_n(held.values.data() + at, run.count, dst);
          } else {
            detail::receive_values(comm, dst, run.count, type, r);
          }
          at += std::size_t(run.count);
        }
      }
    }
  } else {
    std::size_t at = 0;
    for (const auto& t : held.tensors) {
      for (const auto& run : t.runs) {
        detail::send_values(comm, held.values.data() + at, run.count, type, 0);
        at += std::size_t(run.count);
      }
    }
  }

  comm.check_collectively(where, [&] {
    if (rank != 0) return;
    detail::naming_rank(comm, where, [&] {
      TensorList<Scalar, Kokkos::HostSpace> whole;
      for (auto& f : files) {
        whole.push_back({f.name, f.shape, {}});
        whole.back().pieces.push_back(
            {0, Unmanaged1<Scalar, Kokkos::HostSpace>(f.values.data(), f.values.size())});
      }
      save_weights(path, whole, channel_names);
    });
  });
}

/// Collective over `comm`: every rank copies its `params` from the file at `path` (each rank may
/// name its own copy of the file). `options` as for the single-process load_weights, the same on
/// every rank (checked).
template <class Scalar, class MemSpace>
void load_weights(const Communicator& comm, const std::string& path,
                  const TensorList<Scalar, MemSpace>& params, const LoadOptions& options = {}) {
  constexpr const char* where = "dchag::load_weights";
  detail::ScopedRegion region("dchag::load_weights (collective)");
  comm.agree(where, {{"LoadOptions::allow_missing", options.allow_missing ? 1 : 0},
                     {"the number of LoadOptions::channel_names",
                      std::int64_t(options.channel_names.size())},
                     {"LoadOptions::channel_names (a hash)",
                      std::int64_t(detail::hash_name(detail::join_names(options.channel_names)))}});
  detail::LoadPlan<Scalar, MemSpace> plan;
  comm.check_collectively(where, [&] {
    detail::naming_rank(comm, where, [&] {
      const auto file = safetensors::File::open(path);
      plan = detail::plan_load(file, params, options);
      detail::read_load(file, plan);
    });
  });
  detail::apply_load(plan);
}

/// Collective: saves the whole distributed `model` into one file at `path`, written by rank 0 (see
/// the file comment). First checks that its replicated parameters are bit-identical on all ranks
/// (DistributedFrontEnd::verify_replicated).
template <class ExecSpace, class Scalar, class Storage>
void save_weights(const std::string& path,
                  const DistributedFrontEnd<ExecSpace, Scalar, Storage>& model,
                  const std::vector<std::string>& channel_names = {}) {
  model.verify_replicated(ExecSpace());
  std::vector<std::string> replicated;
  for (const auto& t : model.replicated_parameters()) replicated.push_back(t.name);
  save_weights(model.communicator(), path, model.parameters(), replicated, channel_names);
}

/// Collective: every rank of `model` loads its parameters from the file at `path`, which may come
/// from a distributed or a single-process save of the equivalent model (the same channel groups
/// for the D-CHAG modes).
template <class ExecSpace, class Scalar, class Storage>
void load_weights(const std::string& path, DistributedFrontEnd<ExecSpace, Scalar, Storage>& model,
                  const LoadOptions& options = {}) {
  const auto params = model.parameters();
  load_weights(model.communicator(), path, params, options);
}

}  // namespace dchag
