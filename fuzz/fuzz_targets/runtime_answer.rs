//! A container runtime's answer (containerd's GetContainerResponse, ListNamespacesResponse), as
//! qtrace decodes it: whatever the bytes, an error or labels, never a panic or a read past the
//! message; and what qtrace encodes decodes back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qtrace_fuzz::protobuf;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(container)) = protobuf::bytes_of(data, 1) {
        let _ = protobuf::string_of(container, 1);
        if let Ok(labels) = protobuf::string_map(container, 2) {
            assert!(labels.len() <= data.len());
        }
    }
    if let Ok(namespaces) = protobuf::repeated(data, 1) {
        for n in namespaces {
            let _ = protobuf::string_of(n, 1);
        }
    }
    let text = String::from_utf8_lossy(data);
    let mut request = Vec::new();
    protobuf::put_string(&mut request, 1, &text);
    assert_eq!(protobuf::string_of(&request, 1).unwrap(), text);
});
