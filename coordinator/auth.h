// The coordinator's bearer-token check, shared by its services.
#pragma once

#include <string>

#include "grpcpp/grpcpp.h"

namespace mamba::coordinator {

// OK when `token` is empty or the call carries "authorization: Bearer <token>"; UNAUTHENTICATED
// otherwise, saying which flag gives the token (`client_flag`).
inline grpc::Status CheckBearer(const grpc::ServerContext& context, const std::string& token,
                                const std::string& client_flag) {
  if (token.empty()) return grpc::Status::OK;
  const auto it = context.client_metadata().find("authorization");
  if (it == context.client_metadata().end() ||
      std::string(it->second.data(), it->second.size()) != "Bearer " + token) {
    return grpc::Status(
        grpc::StatusCode::UNAUTHENTICATED,
        "this coordinator needs \"authorization: Bearer <token>\" (" + client_flag + ")");
  }
  return grpc::Status::OK;
}

}  // namespace mamba::coordinator
