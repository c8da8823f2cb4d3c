#pragma once
// The NetCDF-C side of the weather example: a read-only file, its variables by name, a time slice
// of one variable, and a variable's mean and standard deviation. Every failure is a
// std::runtime_error naming the file, the variable and what NetCDF said.
#include <netcdf.h>

#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

namespace weather {

struct Variable {
  std::string name;
  int id = -1;
  std::vector<std::string> dims;  // dimension names, slowest first
  std::vector<std::size_t> extents;
};

class NetcdfFile {
 public:
  explicit NetcdfFile(std::string path) : path_(std::move(path)) {
    check(nc_open(path_.c_str(), NC_NOWRITE, &ncid_), "nc_open");
    try {
      int n = 0;
      check(nc_inq_nvars(ncid_, &n), "nc_inq_nvars");
      for (int id = 0; id < n; ++id) variables_.push_back(inquire(id));
    } catch (...) {
      nc_close(ncid_);
      throw;
    }
  }
  ~NetcdfFile() { nc_close(ncid_); }
  NetcdfFile(const NetcdfFile&) = delete;
  NetcdfFile& operator=(const NetcdfFile&) = delete;

  const std::string& path() const { return path_; }
  /// Every variable, in the file's order (ascending variable id).
  const std::vector<Variable>& variables() const { return variables_; }

  /// The variable named `name` (nc_inq_varid), or nullptr.
  const Variable* find(const std::string& name) const {
    int id = -1;
    if (nc_inq_varid(ncid_, name.c_str(), &id) != NC_NOERR) return nullptr;
    return &variables_.at(static_cast<std::size_t>(id));
  }

  /// A coordinate variable: one named like one of its dimensions (time, latitude, longitude).
  static bool is_coordinate(const Variable& v) {
    for (const auto& d : v.dims)
      if (d == v.name) return true;
    return false;
  }

  /// Slice t of a (time, y, x) variable: extents[1] * extents[2] values, converted to float.
  void read_slice(const Variable& v, std::size_t t, float* dst) const {
    const std::size_t start[3] = {t, 0, 0};
    const std::size_t count[3] = {1, v.extents.at(1), v.extents.at(2)};
    check(nc_get_vara_float(ncid_, v.id, start, count, dst), "nc_get_vara_float", v.name);
  }

  /// Every value of a variable, converted to float.
  std::vector<float> read_all(const Variable& v) const {
    std::size_t n = 1;
    for (auto e : v.extents) n *= e;
    std::vector<float> out(n);
    check(nc_get_var_float(ncid_, v.id, out.data()), "nc_get_var_float", v.name);
    return out;
  }

  /// The values of a 1-D variable as double (the time coordinate), empty when it is absent.
  std::vector<double> coordinate(const std::string& name) const {
    const Variable* v = find(name);
    if (v == nullptr || v->extents.size() != 1) return {};
    std::vector<double> out(v->extents[0]);
    check(nc_get_var_double(ncid_, v->id, out.data()), "nc_get_var_double", name);
    return out;
  }

  /// A text attribute of a variable (e.g. the units of time), empty when it is absent.
  std::string text_attribute(const std::string& variable, const std::string& attribute) const {
    const Variable* v = find(variable);
    std::size_t length = 0;
    nc_type type = NC_NAT;
    if (v == nullptr || nc_inq_att(ncid_, v->id, attribute.c_str(), &type, &length) != NC_NOERR ||
        type != NC_CHAR)
      return {};
    std::string s(length, '\0');
    check(nc_get_att_text(ncid_, v->id, attribute.c_str(), s.data()), "nc_get_att_text", variable);
    return s;
  }

 private:
  Variable inquire(int id) const {
    char name[NC_MAX_NAME + 1] = {};
    int ndims = 0;
    int dimids[NC_MAX_VAR_DIMS] = {};
    check(nc_inq_var(ncid_, id, name, nullptr, &ndims, dimids, nullptr), "nc_inq_var");
    Variable v;
    v.name = name;
    v.id = id;
    for (int d = 0; d < ndims; ++d) {
      char dim[NC_MAX_NAME + 1] = {};
      std::size_t length = 0;
      check(nc_inq_dim(ncid_, dimids[d], dim, &length), "nc_inq_dim", v.name);
      v.dims.emplace_back(dim);
      v.extents.push_back(length);
    }
    return v;
  }

  void check(int status, const char* call, const std::string& variable = {}) const {
    if (status == NC_NOERR) return;
    throw std::runtime_error("dchag_weather: " + std::string(call) + " on '" + path_ + "'" +
                             (variable.empty() ? "" : " (variable '" + variable + "')") + ": " +
                             nc_strerror(status));
  }

  std::string path_;
  int ncid_ = -1;
  std::vector<Variable> variables_;
};

/// Mean and population standard deviation (two passes, in double) of float values.
struct Moments {
  double mean = 0, std = 1;
};

inline Moments moments(const std::vector<float>& values) {
  Moments m;
  if (values.empty()) return m;
  double sum = 0;
  for (float v : values) sum += v;
  m.mean = sum / double(values.size());
  double squares = 0;
  for (float v : values) squares += (v - m.mean) * (v - m.mean);
  m.std = std::sqrt(squares / double(values.size()));
  if (!(m.std > 0)) m.std = 1;  // a constant field is only centred
  return m;
}

}  // namespace weather
