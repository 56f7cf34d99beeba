//! gRPC status codes as a type (the gRPC spec's `statuscodes.md`), for the
//! statuses the proxy itself answers with or reasons about. What arrives on
//! the wire stays a number (`grpc_status`): a server may send any value.

use http::HeaderValue;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GrpcCode {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl GrpcCode {
    /// The number on the wire.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The `grpc-status` header value.
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from(self.code())
    }

    /// Whether `code` (as received) is this status.
    pub fn is(self, code: u32) -> bool {
        self.code() == code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_specs_numbers() {
        assert_eq!(GrpcCode::Ok.code(), 0);
        assert_eq!(GrpcCode::DeadlineExceeded.code(), 4);
        assert_eq!(GrpcCode::PermissionDenied.code(), 7);
        assert_eq!(GrpcCode::Unavailable.header_value(), "14");
        assert_eq!(GrpcCode::Unauthenticated.code(), 16);
    }
}
