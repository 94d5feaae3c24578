//! The S3 client the writer uses (object_store) against the real S3 server (s3s-fs in
//! scripts/test.sh): put, list and get objects, including a multipart upload.

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

#[tokio::test]
async fn objects_put_list_and_get_round_trip() {
    let cfg = pulse_tests::s3();
    let store = cfg.object_store().unwrap();
    let prefix = pulse_tests::unique("test");
    let key = Path::from(format!(
        "{prefix}/events/dt=2026-11-28/hour=17/part-0.parquet"
    ));
    let body = bytes::Bytes::from_static(b"PAR1 not really parquet PAR1");
    store
        .put(&key, PutPayload::from(body.clone()))
        .await
        .unwrap();
    // Overwriting the same key replaces the object (retried uploads are idempotent).
    store
        .put(&key, PutPayload::from(body.clone()))
        .await
        .unwrap();

    let listed: Vec<_> = store
        .list(Some(&Path::from(prefix.clone())))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].location, key);
    assert_eq!(listed[0].size, body.len() as u64);

    let got = store.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(got, body);
}

#[tokio::test]
async fn a_multipart_upload_reads_back_whole() {
    let cfg = pulse_tests::s3();
    let store = cfg.object_store().unwrap();
    let key = Path::from(format!("{}/big.bin", pulse_tests::unique("multipart")));
    // Two parts: S3 needs every part but the last to be at least 5 MiB.
    let data: Vec<u8> = (0..(6 * 1024 * 1024 + 123))
        .map(|i| (i % 251) as u8)
        .collect();
    let upload = store.put_multipart(&key).await.unwrap();
    let mut w = WriteMultipart::new_with_chunk_size(upload, 5 * 1024 * 1024);
    w.write(&data);
    w.finish().await.unwrap();
    let got = store.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got.as_ref() == data.as_slice());
}
