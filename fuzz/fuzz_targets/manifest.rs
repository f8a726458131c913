#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmcsnap_node::fuzz::manifest(data));
