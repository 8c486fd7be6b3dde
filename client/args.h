// Pure functions behind the command line (no gRPC, no CLI11), unit-tested on their own:
// "did you mean" suggestions, memfitd's address in the forms users type, and where the
// last N lines of a log begin.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace memfit::cli {

// Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of
// two neighbouring characters each cost 1 ("sumbit" -> "submit" is 1).
size_t edit_distance(std::string_view a, std::string_view b);

// The name in `names` closest to `typed`, or "" when none is close: at most 1 edit for
// names of up to 4 characters, 2 for longer ones, or `typed` a prefix of exactly one
// name (at least 2 characters), and fewer edits than half the name's letters (dashes
// aside: "-x" suggests nothing). Ties go to the first name in `names`.
std::string closest(std::string_view typed, const std::vector<std::string>& names);

constexpr int kDefaultPort = 7540;

// memfitd's address as typed (--server, MEMFIT_SERVER) -> a gRPC target:
//   host            -> host:7540        host:port    -> host:port
//   [v6] / ::1      -> [v6]:7540        [v6]:port    -> [v6]:port
//   grpc://host[:port] -> as host[:port]
//   dns:///host[:port] -> dns:///host:port (gRPC's DNS resolver)
// Anything else (http://..., a path, a port out of 1..65535, an empty value) throws
// std::invalid_argument whose message says what is accepted.
std::string server_target(const std::string& value);

// The offset in `data` where its last `n` lines begin (a final line feed ends the last
// line, it does not start an empty one). `data` is the end of a file; `at_start`: it is
// the whole file. Returns std::string_view::npos when `data` holds fewer than n whole
// lines and more of the file lies before it (read further back).
size_t tail_start(std::string_view data, int64_t n, bool at_start);

}  // namespace memfit::cli
