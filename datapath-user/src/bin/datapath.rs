fn main() {
    println!("{}", datapath::EBPF_OBJECT.len());
}
