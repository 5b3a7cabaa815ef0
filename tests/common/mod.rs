//! Helpers shared by the integration tests.

pub mod daemon;
pub mod netns;
