#![no_main]
// The body is `weft_fuzz_targets::detect`, shared with the stable replay test.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_fuzz_targets::detect(data));
