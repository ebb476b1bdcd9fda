//! Client connections: frames in, requests dispatched to partitions in the order they
//! arrived (so one producer's messages keep their order), replies and deliveries out,
//! coalesced into as few frames as there is room for.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::metrics::Families;
use super::partition::Cmd;
use super::{partition_of, Catalog, MqError};
use crate::proto::{self, Delivery, Reply, Request, Settlement, ANY_PARTITION, VERSION};

pub struct Limits {
    pub connections_max: usize,
    pub requests_in_flight_max: usize,
    pub consumers_max: usize,
}

type Answer = Pin<Box<dyn Future<Output = Reply> + Send>>;

fn error(e: MqError) -> Reply {
    Reply::Error {
        code: e.code(),
        message: e.to_string(),
    }
}

fn ready(r: Reply) -> Answer {
    Box::pin(async move { r })
}

pub async fn accept(
    listener: tokio::net::TcpListener,
    catalog: Arc<Catalog>,
    limits: Limits,
    families: Families,
) {
    let limits = Arc::new(limits);
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.load(Ordering::Acquire) >= limits.connections_max {
            // Say why, then close.
            let mut body = BytesMut::new();
            error(MqError::Limit(format!(
                "this broker holds its limit of {} connections",
                limits.connections_max
            )))
            .encode(0, &mut body);
            let mut f = BytesMut::new();
            proto::frame(&body, &mut f);
            tokio::spawn(async move {
                let _ = stream.write_all(&f).await;
            });
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        families.connections.inc();
        let (catalog, limits, open, families) = (
            catalog.clone(),
            limits.clone(),
            open.clone(),
            families.clone(),
        );
        tokio::spawn(async move {
            serve(stream, catalog, &limits).await;
            open.fetch_sub(1, Ordering::AcqRel);
            families.connections.dec();
        });
    }
}

/// Consumers opened on one connection: id -> queue.
type Consumers = Arc<Mutex<HashMap<u64, String>>>;

async fn serve(stream: TcpStream, catalog: Arc<Catalog>, limits: &Limits) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let (out_tx, mut out_rx) =
        mpsc::channel::<(u32, Reply)>(limits.requests_in_flight_max.max(1) * 2);
    // Deliveries are bounded by the consumers' credit.
    let (dtx, mut drx) = mpsc::unbounded_channel::<Vec<Delivery>>();
    let writer = tokio::spawn(async move {
        let mut body = BytesMut::with_capacity(64 << 10);
        let mut frame = BytesMut::with_capacity(64 << 10);
        let mut deliveries_open = true;
        loop {
            // Replies first; the connection ends when no more replies can come (the
            // deliveries' channel closing first must not lose a reply still queued).
            tokio::select! {
                biased;
                r = out_rx.recv() => match r {
                    Some((id, reply)) => reply.encode(id, &mut body),
                    None => return,
                },
                d = drx.recv(), if deliveries_open => match d {
                    Some(list) => {
                        for d in list {
                            Reply::Deliver(d).encode(0, &mut body);
                        }
                    }
                    None => {
                        deliveries_open = false;
                        continue;
                    }
                },
            }
            // Whatever else is ready goes in the same frame, up to a limit.
            while body.len() < proto::COALESCE_BYTES {
                if let Ok((id, reply)) = out_rx.try_recv() {
                    reply.encode(id, &mut body);
                } else if let Ok(list) = drx.try_recv() {
                    for d in list {
                        Reply::Deliver(d).encode(0, &mut body);
                    }
                } else {
                    break;
                }
            }
            frame.clear();
            proto::frame(&body, &mut frame);
            body.clear();
            if wr.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    let consumers: Consumers = Arc::new(Mutex::new(HashMap::new()));
    let gate = Arc::new(tokio::sync::Semaphore::new(
        limits.requests_in_flight_max.max(1),
    ));
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut greeted = false;
    'conn: loop {
        let n = match proto::frame_len(&buf) {
            Ok(Some(n)) => n,
            Ok(None) => match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            },
            Err(e) => {
                let _ = out_tx
                    .send((0, error(MqError::BadRequest(e.to_string()))))
                    .await;
                break;
            }
        };
        let frame = buf.split_to(n).freeze();
        for m in proto::messages(frame.slice(4..)) {
            let (op, id, body) = match m {
                Ok(m) => m,
                Err(e) => {
                    let _ = out_tx
                        .send((0, error(MqError::BadRequest(e.to_string()))))
                        .await;
                    break 'conn;
                }
            };
            let req = match Request::decode(op, body) {
                Ok(r) => r,
                Err(e) => {
                    let _ = out_tx
                        .send((id, error(MqError::BadRequest(e.to_string()))))
                        .await;
                    continue;
                }
            };
            if !greeted {
                match req {
                    Request::Hello { version } if version == VERSION => {
                        greeted = true;
                        let _ = out_tx.send((id, Reply::Ok)).await;
                        continue;
                    }
                    Request::Hello { version } => {
                        let _ = out_tx.send((id, error(MqError::Version(version)))).await;
                        break 'conn;
                    }
                    _ => {
                        let _ = out_tx
                            .send((id, error(MqError::BadRequest("HELLO comes first".into()))))
                            .await;
                        break 'conn;
                    }
                }
            }
            let Ok(permit) = gate.clone().acquire_owned().await else {
                break 'conn;
            };
            let answer = dispatch(req, &catalog, &consumers, &dtx, limits).await;
            let out = out_tx.clone();
            tokio::spawn(async move {
                let reply = answer.await;
                let _ = out.send((id, reply)).await;
                drop(permit);
            });
        }
    }
    // The connection's consumers leave: what they had in flight is delivered again.
    let mine: Vec<(u64, String)> = consumers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .collect();
    for (consumer, queue) in mine {
        if let Some(q) = catalog.get(&queue) {
            for p in &q.partitions {
                let _ = p.send(Cmd::Unsubscribe { consumer }).await;
            }
        }
    }
    drop(out_tx);
    drop(dtx);
    let _ = writer.await;
}

/// Sends the request's commands (in arrival order) and returns the future of its reply.
async fn dispatch(
    req: Request,
    catalog: &Arc<Catalog>,
    consumers: &Consumers,
    sink: &mpsc::UnboundedSender<Vec<Delivery>>,
    limits: &Limits,
) -> Answer {
    match req {
        Request::Hello { .. } => ready(error(MqError::BadRequest("HELLO was already said".into()))),
        // These talk to other brokers and may take seconds: they run beside the
        // connection's other requests (FETCH and SURVEY ride the same connections).
        Request::Create { name, config } => {
            let catalog = catalog.clone();
            Box::pin(async move {
                match catalog.create(&name, config).await {
                    Ok(()) => Reply::Ok,
                    Err(e) => error(e),
                }
            })
        }
        Request::Delete { name } => {
            let catalog = catalog.clone();
            Box::pin(async move {
                match catalog.delete(&name, true).await {
                    Ok(()) => Reply::Ok,
                    Err(e) => error(e),
                }
            })
        }
        Request::List => ready(Reply::Listed(catalog.list())),
        Request::Produce {
            queue,
            partition,
            messages,
        } => {
            let Some(q) = catalog.get(&queue) else {
                return ready(error(MqError::UnknownQueue(queue)));
            };
            if messages.is_empty() {
                return ready(error(MqError::BadRequest("PRODUCE of no messages".into())));
            }
            let n = q.partitions.len() as u16;
            let index = if partition != ANY_PARTITION {
                if partition >= n {
                    return ready(error(MqError::BadRequest(format!(
                        "partition {partition}: queue {queue} has {n}"
                    ))));
                }
                partition
            } else {
                let p = q.partition_for(&messages[0].key);
                if !messages[0].key.is_empty()
                    && messages.iter().any(|m| partition_of(&m.key, n) != p)
                {
                    return ready(error(MqError::BadRequest(
                        "the batch's keys belong to different partitions: send one PRODUCE per partition (the client library does)".into(),
                    )));
                }
                p
            };
            let (tx, rx) = oneshot::channel();
            if q.partitions[index as usize]
                .send(Cmd::Produce {
                    messages,
                    headers: bytes::Bytes::new(),
                    reply: tx,
                })
                .await
                .is_err()
            {
                return ready(error(MqError::UnknownQueue(queue)));
            }
            Box::pin(async move {
                match rx.await {
                    Ok(Ok((first, count))) => Reply::Produced {
                        partition: index,
                        first,
                        count,
                    },
                    Ok(Err(e)) => error(e),
                    Err(_) => error(MqError::UnknownQueue(queue)),
                }
            })
        }
        Request::Subscribe {
            queue,
            group,
            credit,
            selector,
        } => {
            let Some(q) = catalog.get(&queue) else {
                return ready(error(MqError::UnknownQueue(queue)));
            };
            if let Err(e) = super::valid_name(&group) {
                return ready(error(e));
            }
            // Compiled once here (and shared with every partition); a selector that
            // does not compile is refused with the compiler's position.
            let bytes_max = q.config.message_bytes_max;
            let selector = match selector.as_deref().map(|s| catalog.selector(s, bytes_max)) {
                None => None,
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    return ready(error(MqError::BadSelector(crate::selector::describe(&e))))
                }
            };
            {
                let c = consumers.lock().unwrap_or_else(|p| p.into_inner());
                if c.len() >= limits.consumers_max {
                    return ready(error(MqError::Limit(format!(
                        "a connection has at most {} consumers",
                        limits.consumers_max
                    ))));
                }
            }
            let consumer = catalog.next_consumer.fetch_add(1, Ordering::Relaxed);
            let mut rxs = Vec::new();
            for p in &q.partitions {
                let (tx, rx) = oneshot::channel();
                let _ = p
                    .send(Cmd::Subscribe {
                        group: group.clone(),
                        consumer,
                        credit,
                        sink: sink.clone(),
                        selector: selector.clone(),
                        reply: tx,
                    })
                    .await;
                rxs.push(rx);
            }
            consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(consumer, queue.clone());
            let (consumers, partitions) = (consumers.clone(), q.partitions.clone());
            Box::pin(async move {
                let mut failed = None;
                // The partitions where this subscription made the group.
                let mut created = Vec::new();
                for (i, rx) in rxs.into_iter().enumerate() {
                    match rx.await {
                        Ok(Ok(made)) => {
                            if made {
                                created.push(i);
                            }
                        }
                        Ok(Err(e)) => {
                            failed.get_or_insert(e);
                        }
                        Err(_) => {
                            failed.get_or_insert(MqError::UnknownQueue(queue.clone()));
                        }
                    }
                }
                match failed {
                    None => Reply::Subscribed { consumer },
                    Some(e) => {
                        consumers
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&consumer);
                        for p in &partitions {
                            let _ = p.send(Cmd::Unsubscribe { consumer }).await;
                        }
                        // A refused subscription leaves no group behind where it made
                        // one (with its selector), unless another consumer joined it
                        // meanwhile: docs/MQ.md, "Selectors".
                        for i in created {
                            let _ = partitions[i]
                                .send(Cmd::DropGroup {
                                    group: group.clone(),
                                })
                                .await;
                        }
                        error(e)
                    }
                }
            })
        }
        Request::Credit { consumer, credit } => {
            let Some(q) = queue_of(catalog, consumers, consumer) else {
                return ready(error(MqError::UnknownConsumer(consumer)));
            };
            if credit > crate::delivery::DeliveryConfig::default().credit_max {
                return ready(error(MqError::Limit(format!(
                    "credit {credit} is above the limit"
                ))));
            }
            for p in &q.partitions {
                let _ = p.send(Cmd::Credit { consumer, credit }).await;
            }
            ready(Reply::Ok)
        }
        Request::Settle {
            consumer,
            settlements,
        } => {
            let Some(q) = queue_of(catalog, consumers, consumer) else {
                return ready(error(MqError::UnknownConsumer(consumer)));
            };
            let mut by_partition: HashMap<u16, Vec<Settlement>> = HashMap::new();
            for s in settlements {
                if s.partition as usize >= q.partitions.len() {
                    return ready(error(MqError::BadRequest(format!(
                        "no partition {}",
                        s.partition
                    ))));
                }
                by_partition.entry(s.partition).or_default().push(s);
            }
            let mut rxs = Vec::new();
            for (p, list) in by_partition {
                let (tx, rx) = oneshot::channel();
                let _ = q.partitions[p as usize]
                    .send(Cmd::Settle {
                        consumer,
                        settlements: list,
                        reply: tx,
                    })
                    .await;
                rxs.push(rx);
            }
            Box::pin(async move {
                let mut failed = None;
                for rx in rxs {
                    if let Ok(Err(e)) = rx.await {
                        failed.get_or_insert(e);
                    }
                }
                failed.map_or(Reply::Ok, error)
            })
        }
        Request::Stat { queue } => {
            let Some(q) = catalog.get(&queue) else {
                return ready(error(MqError::UnknownQueue(queue)));
            };
            let mut rxs = Vec::new();
            for p in &q.partitions {
                let (tx, rx) = oneshot::channel();
                let _ = p.send(Cmd::Stat { reply: tx }).await;
                rxs.push(rx);
            }
            let serving: Vec<bool> = q
                .serving
                .iter()
                .map(|f| f.load(Ordering::Acquire))
                .collect();
            Box::pin(async move {
                let mut all = vec![("partitions".to_string(), serving.len() as u64)];
                for (i, s) in serving.iter().enumerate() {
                    all.push((format!("p{i}.serving"), u64::from(*s)));
                }
                for rx in rxs {
                    all.extend(rx.await.unwrap_or_default());
                }
                Reply::Stats(all)
            })
        }
        Request::PeerCreate {
            name,
            config,
            replicas,
        } => {
            let catalog = catalog.clone();
            Box::pin(async move {
                match catalog.adopt(&name, config, replicas).await {
                    Ok(()) => Reply::Ok,
                    Err(e) => error(e),
                }
            })
        }
        Request::PeerDelete { name } => {
            let catalog = catalog.clone();
            Box::pin(async move {
                match catalog.delete(&name, false).await {
                    Ok(()) => Reply::Ok,
                    Err(e) => error(e),
                }
            })
        }
        Request::Move { queue, from, to } => {
            let catalog = catalog.clone();
            // Long (every partition's change confirmed in turn): answered when done.
            Box::pin(async move {
                match catalog.move_replica(&queue, &from, &to).await {
                    Ok(()) => Reply::Ok,
                    Err(e) => error(e),
                }
            })
        }
        Request::PeerMove {
            queue,
            partition,
            from,
            to,
        } => {
            let Some(p) = catalog.partition_sender(&queue, partition) else {
                return ready(error(MqError::UnknownQueue(queue)));
            };
            let (tx, rx) = oneshot::channel();
            let _ = p
                .send(Cmd::Reconfigure {
                    from,
                    to,
                    reply: tx,
                })
                .await;
            Box::pin(async move {
                match rx.await {
                    Ok(Ok(())) => Reply::Ok,
                    Ok(Err(e)) => error(e),
                    Err(_) => error(MqError::UnknownQueue(queue)),
                }
            })
        }
        Request::Fetch {
            queue,
            partition,
            replica,
            token,
            offset,
            hw,
            epochs,
        } => {
            let Some(p) = catalog.partition_sender(&queue, partition) else {
                return ready(error(MqError::UnknownQueue(queue)));
            };
            let (tx, rx) = oneshot::channel();
            let _ = p
                .send(Cmd::Fetch {
                    replica,
                    token,
                    offset,
                    hw,
                    epochs,
                    reply: tx,
                })
                .await;
            Box::pin(async move {
                match rx.await {
                    Ok(Ok(f)) => Reply::Fetched(f),
                    Ok(Err(e)) => error(e),
                    Err(_) => error(MqError::UnknownQueue(queue)),
                }
            })
        }
        Request::Survey {
            queue,
            partition,
            token,
        } => {
            let Some(p) = catalog.partition_sender(&queue, partition) else {
                return ready(error(MqError::UnknownQueue(queue)));
            };
            let (tx, rx) = oneshot::channel();
            let _ = p.send(Cmd::Survey { token, reply: tx }).await;
            Box::pin(async move {
                match rx.await {
                    Ok(Ok(s)) => Reply::Surveyed {
                        end: s.end,
                        epochs: s.epochs,
                    },
                    Ok(Err(e)) => error(e),
                    Err(_) => error(MqError::UnknownQueue(queue)),
                }
            })
        }
        Request::Unsubscribe { consumer } => {
            let removed = consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&consumer);
            let Some(queue) = removed else {
                return ready(error(MqError::UnknownConsumer(consumer)));
            };
            if let Some(q) = catalog.get(&queue) {
                for p in &q.partitions {
                    let _ = p.send(Cmd::Unsubscribe { consumer }).await;
                }
            }
            ready(Reply::Ok)
        }
    }
}

fn queue_of(
    catalog: &Catalog,
    consumers: &Consumers,
    consumer: u64,
) -> Option<Arc<super::QueueEntry>> {
    let queue = consumers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&consumer)
        .cloned()?;
    catalog.get(&queue)
}
