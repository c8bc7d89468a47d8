//! Integration tests of the ingest crate through its public API. The heap is
//! counted per thread (see [`alloc`]), so a test can bound what a call allocates.

mod alloc;
mod decoders;
mod http;
mod listener;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;
