//! Rebuild the programs when the bpf-linker binary changes: cargo does not
//! know that linking for bpfel-unknown-none runs it.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
