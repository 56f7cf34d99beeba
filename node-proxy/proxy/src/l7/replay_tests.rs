use super::*;
use futures::StreamExt;
use futures::channel::mpsc;
use http_body_util::{BodyExt, StreamBody};

type Source =
    StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, std::convert::Infallible>>>;

/// A client body fed by the test, frame by frame.
fn streamed() -> (mpsc::UnboundedSender<Frame<Bytes>>, Source) {
    let (tx, rx) = mpsc::unbounded();
    (tx, StreamBody::new(rx.map(Ok).boxed()))
}

fn trailers() -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("x-checksum", "abc".parse().unwrap());
    t
}

async fn next_data<B: Body<Data = Bytes, Error = BodyError> + Unpin>(b: &mut B) -> Bytes {
    b.frame()
        .await
        .expect("a frame")
        .expect("no error")
        .into_data()
        .expect("data")
}

#[tokio::test]
async fn a_retry_replays_what_was_read_then_reads_on_and_keeps_the_trailers() {
    let (tx, source) = streamed();
    let (mut first, replay) = ReplayBody::new(source);
    tx.unbounded_send(Frame::data(Bytes::from_static(b"one")))
        .unwrap();
    assert_eq!(next_data(&mut first).await, "one");
    // The first attempt fails before the client has sent the rest.
    let mut second = replay.next().expect("replayable");
    tx.unbounded_send(Frame::data(Bytes::from_static(b"two")))
        .unwrap();
    tx.unbounded_send(Frame::trailers(trailers())).unwrap();
    drop(tx);
    let collected = (&mut second).collect().await.unwrap();
    assert_eq!(collected.trailers(), Some(&trailers()));
    assert_eq!(collected.to_bytes(), "onetwo");
    // The earlier attempt may still be polled by hyper: it must not take
    // the client's bytes any more.
    let stale = first.frame().await.expect("a frame");
    assert!(stale.is_err(), "superseded: {stale:?}");
    // A third attempt sends it all again, trailers included.
    let third = replay.next().expect("still replayable");
    let collected = third.collect().await.unwrap();
    assert_eq!(collected.trailers(), Some(&trailers()));
    assert_eq!(collected.to_bytes(), "onetwo");
}

#[tokio::test]
async fn a_body_larger_than_the_cap_is_forwarded_whole_but_not_kept() {
    let (tx, source) = streamed();
    let (mut first, replay) = ReplayBody::new(source);
    let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
    for _ in 0..5 {
        tx.unbounded_send(Frame::data(chunk.clone())).unwrap();
    }
    drop(tx);
    let mut forwarded = 0;
    while let Some(frame) = first.frame().await {
        forwarded += frame.unwrap().into_data().unwrap().len();
        if forwarded <= MAX_REPLAY_BODY {
            assert!(replay.is_replayable(), "{forwarded} bytes fit");
        }
    }
    assert_eq!(forwarded, 5 * 16 * 1024, "the first attempt gets it all");
    assert!(!replay.is_replayable());
    assert!(replay.next().is_none(), "80 KiB > 64 KiB: not retried");
}

#[tokio::test]
async fn known_lengths_and_empty_bodies_keep_their_size_and_end() {
    let full = http_body_util::Full::new(Bytes::from_static(b"hello"));
    let (mut first, replay) = ReplayBody::new(full);
    assert_eq!(first.size_hint().exact(), Some(5), "Content-Length kept");
    assert_eq!(next_data(&mut first).await, "hello");
    assert!(first.frame().await.is_none());
    let second = replay.next().unwrap();
    assert_eq!(second.size_hint().exact(), Some(5));
    assert_eq!(second.collect().await.unwrap().to_bytes(), "hello");

    // A GET: the end is known at once, so HTTP/2 ends the stream with the
    // headers and HTTP/1 sends no body.
    let (empty, replay) = ReplayBody::new(http_body_util::Empty::<Bytes>::new());
    assert!(empty.is_end_stream());
    assert_eq!(empty.size_hint().exact(), Some(0));
    assert!(replay.next().unwrap().is_end_stream());
}

#[tokio::test]
async fn a_failed_client_body_is_not_replayed() {
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
        Ok(Frame::data(Bytes::from_static(b"part"))),
        Err(std::io::Error::other("client reset")),
    ];
    let (mut first, replay) = ReplayBody::new(StreamBody::new(futures::stream::iter(frames)));
    assert_eq!(next_data(&mut first).await, "part");
    assert!(first.frame().await.unwrap().is_err());
    assert!(replay.next().is_none());
}
