//! The boxed response stream every streaming handler returns, apart so the modules that make
//! one (transfers, tunnels, ReverseHTTP) need not import the service that serves them.

use std::pin::Pin;

use futures::Stream;
use tonic::Status;

/// A boxed stream of messages or a status, as both services' streaming calls use.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
