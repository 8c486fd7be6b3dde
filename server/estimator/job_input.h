// The estimator's input for a job as the CLI and the worker see it: the job, its
// config, the device, and what the job's files say (a validation split, a checkpoint to
// load, the stored images' side length). Reads the IDX header of image data; the
// estimator itself does no I/O.
#pragma once

#include "estimator.h"

namespace memfit::estimator {

Input job_input(const spec::Job& job, const model::ModelConfig& config, const DeviceModel& device);

// The side length of the images in an IDX file (0 when not square IDX or unreadable).
int64_t idx_image_side(const std::string& path);

}  // namespace memfit::estimator
