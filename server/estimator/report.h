// The estimate and the fit plan as JSON, the same object for `memfit estimate -o json`
// and memfitd's EstimateJob (nlohmann-json; the estimator itself stays dependency-free).
#pragma once

#include <nlohmann/json.hpp>

#include "estimator.h"
#include "fit.h"

namespace memfit::estimator {

nlohmann::ordered_json to_json(const Estimate& e);
nlohmann::ordered_json to_json(const spec::Memory& m);
nlohmann::ordered_json to_json(const FitPlan& p);

}  // namespace memfit::estimator
