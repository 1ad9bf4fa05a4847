//! # stratus-model-tests
//!
//! Model-based tests. This crate will hold a reference model of the cloud (what should exist) and
//! proptest state-machine tests that drive the full management stack in the simulated datacenter
//! with random operation sequences and faults, checking after every step that nothing leaked,
//! nothing is stuck in a transitional state, and the database agrees with the simulated hosts.
//! A failure prints its seed and shrunk sequence, and `ci/model --replay FILE` reruns it.
