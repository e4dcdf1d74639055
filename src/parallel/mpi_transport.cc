// MPI transport: one process per stage. Only this file includes mpi.h.
#include <mpi.h>

#include <climits>
#include <cstdio>
#include <cstring>
#include <list>

#include "parallel/transport.h"

namespace sp {

namespace {

#define SP_MPI_CHECK(call)                                                               \
  do {                                                                                   \
    int _rc = (call);                                                                    \
    if (_rc != MPI_SUCCESS) {                                                            \
      char _msg[MPI_MAX_ERROR_STRING];                                                   \
      int _len = 0;                                                                      \
      MPI_Error_string(_rc, _msg, &_len);                                                \
      return Status::error(str("stage ", rank_, ": MPI call " #call " failed: ", _msg)); \
    }                                                                                    \
  } while (0)

class MpiTransport final : public Transport {
 public:
  MpiTransport() {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &world_);
    // Errors come back as codes so they can be reported with the stage's name.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  }
  ~MpiTransport() override {
    for (auto& p : pending_) MPI_Wait(&p.request, MPI_STATUS_IGNORE);
    pending_.clear();
    MPI_Finalize();
  }
  std::string name() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int world() const override { return world_; }

  Status send(int dst, Channel ch, std::vector<uint8_t> header, const void* data,
              int64_t n) override {
    progress();
    if (header.size() > INT_MAX || n > INT_MAX)
      return Status::error(str("stage ", rank_, ": message too large for one MPI send"));
    pending_.push_back({});
    Pending& h = pending_.back();
    h.bytes = std::move(header);
    SP_MPI_CHECK(MPI_Isend(h.bytes.data(), static_cast<int>(h.bytes.size()), MPI_BYTE, dst,
                           tag(ch, false), MPI_COMM_WORLD, &h.request));
    if (n > 0) {
      pending_.push_back({});
      Pending& d = pending_.back();
      d.bytes.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + n);
      SP_MPI_CHECK(MPI_Isend(d.bytes.data(), static_cast<int>(n), MPI_BYTE, dst, tag(ch, true),
                             MPI_COMM_WORLD, &d.request));
    }
    return Status::ok();
  }

  Status recv(int src, Channel ch, std::vector<uint8_t>& header, const PayloadSize& payload_size,
              std::vector<uint8_t>& data) override {
    MPI_Status st;
    SP_MPI_CHECK(MPI_Probe(src, tag(ch, false), MPI_COMM_WORLD, &st));
    int count = 0;
    MPI_Get_count(&st, MPI_BYTE, &count);
    header.resize(static_cast<size_t>(count));
    SP_MPI_CHECK(MPI_Recv(header.data(), count, MPI_BYTE, src, tag(ch, false), MPI_COMM_WORLD,
                          MPI_STATUS_IGNORE));
    const int64_t n = payload_size ? payload_size(header) : 0;
    if (n < 0 || n > INT_MAX)
      return Status::error(str("stage ", rank_, ": malformed message from stage ", src));
    data.resize(static_cast<size_t>(n));
    if (n > 0)
      SP_MPI_CHECK(MPI_Recv(data.data(), static_cast<int>(n), MPI_BYTE, src, tag(ch, true),
                            MPI_COMM_WORLD, MPI_STATUS_IGNORE));
    progress();
    return Status::ok();
  }

  bool ready(int src, Channel ch) override {
    int flag = 0;
    MPI_Iprobe(src, tag(ch, false), MPI_COMM_WORLD, &flag, MPI_STATUS_IGNORE);
    progress();
    return flag != 0;
  }

  Status allgather(const std::string& mine, std::vector<std::string>* all) override {
    constexpr int kLen = 2048;
    std::vector<char> send(kLen, 0), recv(static_cast<size_t>(kLen) * world_, 0);
    std::memcpy(send.data(), mine.data(), std::min<size_t>(mine.size(), kLen - 1));
    SP_MPI_CHECK(
        MPI_Allgather(send.data(), kLen, MPI_CHAR, recv.data(), kLen, MPI_CHAR, MPI_COMM_WORLD));
    all->clear();
    for (int r = 0; r < world_; ++r) all->emplace_back(recv.data() + static_cast<size_t>(r) * kLen);
    return Status::ok();
  }

  Result<double> allreduce_max(double v) override {
    double out = v;
    SP_MPI_CHECK(MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
    return out;
  }

  // MPI_Abort brings every rank down; the launcher reports which rank called it.
  [[noreturn]] void fail(const std::string& message, int exit_code) override {
    std::fprintf(stderr, "error: %s\n", message.c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, exit_code);
    std::_Exit(exit_code);
  }

 private:
  struct Pending {
    MPI_Request request = MPI_REQUEST_NULL;
    std::vector<uint8_t> bytes;
  };
  static int tag(Channel ch, bool payload) { return static_cast<int>(ch) * 2 + (payload ? 1 : 0); }
  void progress() {
    for (auto it = pending_.begin(); it != pending_.end();) {
      int done = 0;
      MPI_Test(&it->request, &done, MPI_STATUS_IGNORE);
      it = done ? pending_.erase(it) : std::next(it);
    }
  }

  int rank_ = 0, world_ = 1;
  std::list<Pending> pending_;
};

}  // namespace

Result<std::unique_ptr<Transport>> make_mpi_transport(int* argc, char*** argv) {
  int provided = 0;
  if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
    return Status::error(
        "MPI_Init failed: is seekpipe started by mpirun with a working MPI installation?");
  return std::unique_ptr<Transport>(new MpiTransport());
}

}  // namespace sp
