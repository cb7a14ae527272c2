//! The inference engine: request -> scheduler -> model runner -> sampler -> scheduler.
#![deny(missing_docs)]
