// memfit: the command line. Its verbs, flags and help are defined in cli.cpp; `estimate`
// works without a daemon, the other verbs talk to memfitd over gRPC (jobs_cmd.cpp).
#include <string>
#include <vector>

#include "cli.h"

int main(int argc, char** argv) { return memfit::cli::run(std::vector<std::string>(argv + 1, argv + argc)); }
