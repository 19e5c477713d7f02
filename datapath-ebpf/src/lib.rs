//! The eBPF programs live in the `datapath-ebpf` binary target (see
//! `main.rs`); this empty library only lets datapath-user name the crate as a
//! build dependency so that cargo rebuilds the programs when they change.
#![no_std]
