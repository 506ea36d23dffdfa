#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgecard_node::fuzzing::storefront_form(data));
