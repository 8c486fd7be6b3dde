// The gRPC services: authentication, then a call into the core; CoreError codes become
// gRPC status codes (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, ...).
#pragma once

#include <grpcpp/grpcpp.h>
#include <grpcpp/support/server_interceptor.h>

#include <memory>
#include <vector>

#include "auth.h"
#include "core.h"
#include "memfit/v1/service.grpc.pb.h"

namespace memfit::daemon {

class JobServiceImpl final : public v1::JobService::Service {
 public:
  JobServiceImpl(Core& core, const Auth& auth) : core_(core), auth_(auth) {}
  grpc::Status SubmitJob(grpc::ServerContext* ctx, const v1::SubmitJobRequest* r, v1::Job* out) override;
  grpc::Status GetJob(grpc::ServerContext* ctx, const v1::GetJobRequest* r, v1::Job* out) override;
  grpc::Status ListJobs(grpc::ServerContext* ctx, const v1::ListJobsRequest* r, v1::ListJobsResponse* out) override;
  grpc::Status CancelJob(grpc::ServerContext* ctx, const v1::CancelJobRequest* r, v1::Job* out) override;
  grpc::Status WatchJob(grpc::ServerContext* ctx, const v1::WatchJobRequest* r,
                        grpc::ServerWriter<v1::JobEvent>* w) override;
  grpc::Status ListJobEvents(grpc::ServerContext* ctx, const v1::ListJobEventsRequest* r,
                             v1::ListJobEventsResponse* out) override;
  grpc::Status ReadJobLog(grpc::ServerContext* ctx, const v1::ReadJobLogRequest* r,
                          v1::ReadJobLogResponse* out) override;

 private:
  Core& core_;
  const Auth& auth_;
};

class ClusterServiceImpl final : public v1::ClusterService::Service {
 public:
  ClusterServiceImpl(Core& core, const Auth& auth) : core_(core), auth_(auth) {}
  grpc::Status ListDevices(grpc::ServerContext* ctx, const v1::ListDevicesRequest* r,
                           v1::ListDevicesResponse* out) override;
  grpc::Status EstimateJob(grpc::ServerContext* ctx, const v1::EstimateJobRequest* r,
                           v1::EstimateJobResponse* out) override;
  grpc::Status GetVersion(grpc::ServerContext* ctx, const v1::GetVersionRequest* r,
                          v1::GetVersionResponse* out) override;

 private:
  Core& core_;
  const Auth& auth_;
};

// Every status leaves with a message. gRPC itself answers a request it cannot parse
// (truncated, or a string that is not UTF-8) with INTERNAL and no message before any
// handler runs; this interceptor turns that into INVALID_ARGUMENT saying so.
std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> StatusInterceptors();

}  // namespace memfit::daemon
