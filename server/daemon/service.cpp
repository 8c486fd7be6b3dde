#include "service.h"

#include <functional>

#include "memfit_version.h"

namespace memfit::daemon {
namespace {

grpc::StatusCode code_of(Code c) {
  switch (c) {
    case Code::kInvalidArgument: return grpc::StatusCode::INVALID_ARGUMENT;
    case Code::kNotFound: return grpc::StatusCode::NOT_FOUND;
    case Code::kPermissionDenied: return grpc::StatusCode::PERMISSION_DENIED;
    case Code::kFailedPrecondition: return grpc::StatusCode::FAILED_PRECONDITION;
    case Code::kResourceExhausted: return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case Code::kInternal: return grpc::StatusCode::INTERNAL;
    case Code::kUnavailable: return grpc::StatusCode::UNAVAILABLE;
  }
  return grpc::StatusCode::UNKNOWN;
}

// Authenticates, runs fn, maps errors. Nothing escapes as an exception.
grpc::Status call(grpc::ServerContext* ctx, const Auth& auth, const std::function<void(const Caller&)>& fn) {
  std::string header;
  const auto& md = ctx->client_metadata();
  const auto it = md.find("authorization");
  if (it != md.end()) header.assign(it->second.data(), it->second.size());
  const auto caller = auth.caller(header);
  if (!caller) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        header.empty() ? "missing authorization: Bearer TOKEN" : "unknown token");
  }
  try {
    fn(*caller);
    return grpc::Status::OK;
  } catch (const CoreError& e) {
    return grpc::Status(code_of(e.code), e.what());
  } catch (const store::StoreError& e) {
    // The database could not be read or written (disk full, I/O error): try again later.
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, std::string("memfitd's state: ") + e.what());
  } catch (const std::exception& e) {
    const std::string m = e.what();
    return grpc::Status(grpc::StatusCode::INTERNAL, m.empty() ? "internal error (no detail)" : m);
  }
}

class StatusInterceptor : public grpc::experimental::Interceptor {
 public:
  void Intercept(grpc::experimental::InterceptorBatchMethods* m) override {
    using grpc::experimental::InterceptionHookPoints;
    if (m->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status s = m->GetSendStatus();
      if (!s.ok() && s.error_message().empty()) {
        if (s.error_code() == grpc::StatusCode::INTERNAL) {
          m->ModifySendStatus(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                           "the request could not be parsed: it is truncated, or a string field is "
                                           "not valid UTF-8"));
        } else {
          m->ModifySendStatus(grpc::Status(s.error_code(), "no detail"));
        }
      }
    }
    m->Proceed();
  }
};

class StatusInterceptorFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo*) override {
    return new StatusInterceptor;
  }
};

}  // namespace

std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> StatusInterceptors() {
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> v;
  v.push_back(std::make_unique<StatusInterceptorFactory>());
  return v;
}

grpc::Status JobServiceImpl::SubmitJob(grpc::ServerContext* ctx, const v1::SubmitJobRequest* r, v1::Job* out) {
  return call(ctx, auth_, [&](const Caller& c) { *out = core_.submit(c, *r); });
}

grpc::Status JobServiceImpl::GetJob(grpc::ServerContext* ctx, const v1::GetJobRequest* r, v1::Job* out) {
  return call(ctx, auth_, [&](const Caller& c) { *out = core_.get(c, r->id()); });
}

grpc::Status JobServiceImpl::ListJobs(grpc::ServerContext* ctx, const v1::ListJobsRequest* r,
                                      v1::ListJobsResponse* out) {
  return call(ctx, auth_, [&](const Caller& c) { *out = core_.list(c, *r); });
}

grpc::Status JobServiceImpl::CancelJob(grpc::ServerContext* ctx, const v1::CancelJobRequest* r, v1::Job* out) {
  return call(ctx, auth_, [&](const Caller& c) { *out = core_.cancel(c, r->id()); });
}

grpc::Status JobServiceImpl::ListJobEvents(grpc::ServerContext* ctx, const v1::ListJobEventsRequest* r,
                                           v1::ListJobEventsResponse* out) {
  return call(ctx, auth_, [&](const Caller& c) { *out = core_.events(c, *r); });
}

grpc::Status JobServiceImpl::ReadJobLog(grpc::ServerContext* ctx, const v1::ReadJobLogRequest* r,
                                        v1::ReadJobLogResponse* out) {
  return call(ctx, auth_, [&](const Caller& c) { *out = core_.read_log(c, *r); });
}

grpc::Status JobServiceImpl::WatchJob(grpc::ServerContext* ctx, const v1::WatchJobRequest* r,
                                      grpc::ServerWriter<v1::JobEvent>* w) {
  return call(ctx, auth_, [&](const Caller& c) {
    int64_t after = r->after_seq();
    for (;;) {
      if (ctx->IsCancelled()) return;
      bool done = false;
      for (const auto& e : core_.watch(c, r->id(), after, 1000, &done)) {
        if (!w->Write(e)) return;  // the client went away
        after = e.seq();
      }
      if (done) return;
    }
  });
}

grpc::Status ClusterServiceImpl::ListDevices(grpc::ServerContext* ctx, const v1::ListDevicesRequest*,
                                             v1::ListDevicesResponse* out) {
  return call(ctx, auth_, [&](const Caller&) { *out = core_.devices(); });
}

grpc::Status ClusterServiceImpl::EstimateJob(grpc::ServerContext* ctx, const v1::EstimateJobRequest* r,
                                             v1::EstimateJobResponse* out) {
  return call(ctx, auth_, [&](const Caller& c) { *out = core_.estimate(c, *r); });
}

grpc::Status ClusterServiceImpl::GetVersion(grpc::ServerContext* ctx, const v1::GetVersionRequest*,
                                            v1::GetVersionResponse* out) {
  return call(ctx, auth_, [&](const Caller&) {
    out->set_version(kMemfitVersion);
    out->set_commit(kMemfitCommit);
  });
}

}  // namespace memfit::daemon
