//! In-process swarm tests on the memory transport: real actors, real libp2p protocols, no
//! sockets. Every wait is bounded.

use crate::codec::{Checked, Codec};
use crate::{Config, Delivery, Membership, Net, PeerView, Spawned, Transport, spawn, unix_now};
use blendnet_core::{Invites, Roster};
use blendnet_proto::wire::{
    Capabilities, IdentityCloud, IdentityProof, JoinResponse, MAX_REQUEST_BYTES, RequiredProof,
};
use blendnet_proto::{JOIN_PROTOCOL, MeshKey, Role, Roles, Topic};
use futures::StreamExt;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, identity, request_response};
use std::time::Duration;
use tokio::sync::mpsc;

/// Upper bound for anything that should happen "at once" on the memory transport.
const SOON: Duration = Duration::from_secs(10);

struct TestNode {
    peer: PeerId,
    addr: Multiaddr,
    net: Net,
    deliveries: mpsc::Receiver<Delivery>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn memory_addr() -> Multiaddr {
    format!("/memory/{}", rand::random::<u64>() >> 1)
        .parse()
        .unwrap()
}

fn start(
    keypair: identity::Keypair,
    membership: Membership,
    invites: Invites,
    bootstrap: Vec<Multiaddr>,
) -> TestNode {
    start_with(keypair, membership, invites, bootstrap, None, None)
}

fn start_with(
    keypair: identity::Keypair,
    membership: Membership,
    invites: Invites,
    bootstrap: Vec<Multiaddr>,
    join_proof: Option<IdentityProof>,
    verifier: Option<crate::IdentityVerifier>,
) -> TestNode {
    let peer = keypair.public().to_peer_id();
    let addr = memory_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let Spawned {
        net, deliveries, ..
    } = spawn(
        Config {
            keypair,
            transport: Transport::Memory,
            listen: vec![addr.clone()],
            bootstrap,
            mdns: false,
            membership,
            invites,
            known_addrs: Vec::new(),
            capabilities: Capabilities::default(),
            join_proof,
            verifier,
        },
        async move {
            let _ = stopped.await;
        },
    )
    .expect("actor starts");
    TestNode {
        peer,
        addr,
        net,
        deliveries,
        _stop: stop,
    }
}

/// Tells `node` what mDNS would report of `pending` on a LAN (the memory transport has no
/// multicast).
async fn announce_on_lan(node: &TestNode, pending: &TestNode) {
    node.net
        .tx
        .send(crate::NetMessage::Discovered(vec![(
            pending.peer,
            pending.addr.clone(),
        )]))
        .await
        .expect("actor runs");
}

/// Starts a member of `roster`'s mesh (holding the mesh key if `mesh_key` is given).
fn member(
    keypair: identity::Keypair,
    roster: Roster,
    mesh_key: Option<MeshKey>,
    bootstrap: Vec<Multiaddr>,
) -> TestNode {
    start(
        keypair,
        Membership::Member { roster, mesh_key },
        Invites::default(),
        bootstrap,
    )
}

/// A mesh whose key holder is the first node and whose members hold `roles[i]`.
fn mesh(roles: &[Roles]) -> (MeshKey, Vec<identity::Keypair>, Roster) {
    let key = MeshKey::generate();
    let keypairs: Vec<identity::Keypair> = roles
        .iter()
        .map(|_| identity::Keypair::generate_ed25519())
        .collect();
    let mut roster = Roster::new(key.id());
    for (kp, r) in keypairs.iter().zip(roles) {
        let cert = key.certify(
            kp.public().to_peer_id(),
            *r,
            unix_now() + 3600,
            rand::random(),
        );
        roster.insert_certificate(cert).unwrap();
    }
    (key, keypairs, roster)
}

async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn online(net: &Net, peer: PeerId) -> bool {
    net.peers()
        .await
        .unwrap()
        .iter()
        .any(|p: &PeerView| p.peer_id == peer.to_string() && p.online)
}

/// Publishes until gossipsub has a peer to send to (its mesh forms within a heartbeat or two).
async fn publish_when_ready(net: &Net, topic: Topic, data: Vec<u8>) {
    eventually("gossip peers to publish to", || {
        let data = data.clone();
        async move { net.publish(topic, data).await.unwrap().ok() }
    })
    .await
}

async fn next_delivery(rx: &mut mpsc::Receiver<Delivery>, within: Duration) -> Option<Delivery> {
    tokio::time::timeout(within, rx.recv()).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_the_role_cannot_publish_that_message_type() {
    let submit = Roles::from(Role::Submit) | Roles::from(Role::Render);
    let render = Roles::from(Role::Render);
    let (key, kps, roster) = mesh(&[Roles::default_member(), render, submit]);
    let a = member(kps[0].clone(), roster.clone(), Some(key), vec![]);
    let member =
        |i: usize, a: &TestNode| member(kps[i].clone(), roster.clone(), None, vec![a.addr.clone()]);
    let b = member(1, &a);
    let mut c = member(2, &a);
    let mut a = a;
    eventually("all connected", || async {
        (online(&a.net, b.peer).await && online(&a.net, c.peer).await).then_some(())
    })
    .await;

    // B holds only `render`: its job announcement is refused by every receiver.
    publish_when_ready(&b.net, Topic::Jobs, b"job from a render-only peer".to_vec()).await;
    // C holds `submit`: its announcement arrives, and B's never does.
    publish_when_ready(&c.net, Topic::Jobs, b"job from a submitter".to_vec()).await;
    let got = next_delivery(&mut a.deliveries, SOON)
        .await
        .expect("C's job reaches A");
    assert_eq!(got.source, c.peer);
    assert_eq!(got.data, b"job from a submitter");
    assert!(
        next_delivery(&mut a.deliveries, Duration::from_secs(2))
            .await
            .is_none(),
        "B's job must be dropped"
    );
    assert!(
        next_delivery(&mut c.deliveries, Duration::from_millis(200))
            .await
            .is_none(),
        "B's job must not reach C either"
    );

    // Render events are fine for B.
    publish_when_ready(&b.net, Topic::Tasks, b"task event".to_vec()).await;
    let got = next_delivery(&mut a.deliveries, SOON)
        .await
        .expect("B's task event reaches A");
    assert_eq!(got.source, b.peer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_from_a_non_member_is_dropped() {
    // A is a member of mesh 1 with an open invite, so its gate lets unknown peers in on
    // probation. X belongs to mesh 2, whose roster (made by X's owner) lists A, so X connects
    // to A, subscribes and publishes.
    let (key1, kps1, roster1) = mesh(&[Roles::default_member()]);
    let mut invites = Invites::default();
    invites.issue(
        blendnet_proto::Token([1; 16]),
        Roles::default_member(),
        unix_now() + 3600,
        None,
    );
    let mut a = start(
        kps1[0].clone(),
        Membership::Member {
            roster: roster1,
            mesh_key: Some(key1),
        },
        invites,
        vec![],
    );
    let key2 = MeshKey::generate();
    let x_kp = identity::Keypair::generate_ed25519();
    let x = x_kp.public().to_peer_id();
    let mut roster2 = Roster::new(key2.id());
    for p in [x, a.peer] {
        roster2
            .insert_certificate(key2.certify(
                p,
                Roles::default_member(),
                unix_now() + 3600,
                rand::random(),
            ))
            .unwrap();
    }
    let xn = member(x_kp, roster2, Some(key2), vec![a.addr.clone()]);
    eventually("X connected to A", || async {
        online(&xn.net, a.peer).await.then_some(())
    })
    .await;
    for _ in 0..20 {
        let _ = xn
            .net
            .publish(Topic::Jobs, b"job from a stranger".to_vec())
            .await
            .unwrap();
        let _ = xn.net.publish(Topic::Status, vec![1, 2, 3]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        next_delivery(&mut a.deliveries, Duration::from_secs(1))
            .await
            .is_none()
    );
    let peers = a.net.peers().await.unwrap();
    assert_eq!(peers.len(), 1, "only A itself is listed: {peers:?}");
    assert!(peers[0].is_self);
    assert_eq!(a.net.status().await.unwrap().peer_count, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_gossip_gets_the_member_disconnected_and_the_node_keeps_running() {
    let (key, kps, roster) = mesh(&[
        Roles::default_member(),
        Roles::default_member(),
        Roles::default_member(),
    ]);
    let a = member(kps[0].clone(), roster.clone(), Some(key), vec![]);
    let b = member(kps[1].clone(), roster.clone(), None, vec![a.addr.clone()]);
    let c = member(kps[2].clone(), roster, None, vec![a.addr.clone()]);
    eventually("all connected", || async {
        (online(&a.net, b.peer).await && online(&a.net, c.peer).await).then_some(())
    })
    .await;
    // A status message that is not a PeerStatus at all.
    publish_when_ready(&b.net, Topic::Status, vec![0xff; 40]).await;
    eventually("A drops B", || async {
        (!online(&a.net, b.peer).await).then_some(())
    })
    .await;
    // B stays out for a while (it is refused at the gate), C is unaffected, A answers.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!online(&a.net, b.peer).await, "B must stay disconnected");
    }
    assert!(online(&a.net, c.peer).await);
    assert_eq!(a.net.status().await.unwrap().peer_count, 1);
}

/// A misbehaving peer: speaks the join protocol with a codec that has no limit.
#[derive(NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
struct Rogue {
    join: request_response::Behaviour<Codec<RogueRequest, JoinResponse>>,
}

/// Encodes as a variant index that `JoinRequest` does not have, or as a huge message.
#[derive(serde::Serialize, serde::Deserialize)]
#[allow(dead_code)] // Only `Huge` and `Garbage` are sent; the others pad the variant index.
enum RogueRequest {
    Huge(Vec<u8>),
    A,
    B,
    C,
    D,
    E,
    F,
    Garbage(u32),
}

impl std::fmt::Debug for RogueRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the megabyte of a huge request.
        f.write_str("RogueRequest")
    }
}

fn rogue_swarm() -> Swarm<Rogue> {
    let key = identity::Keypair::generate_ed25519();
    libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| {
            use libp2p::Transport as _;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                libp2p::core::transport::MemoryTransport::default()
                    .upgrade(libp2p::core::upgrade::Version::V1)
                    .authenticate(libp2p::noise::Config::new(key)?)
                    .multiplex(libp2p::yamux::Config::default()),
            )
        })
        .unwrap()
        .with_behaviour(|_| Rogue {
            join: request_response::Behaviour::with_codec(
                Codec::new(usize::MAX, usize::MAX),
                [(
                    StreamProtocol::new(JOIN_PROTOCOL),
                    request_response::ProtocolSupport::Full,
                )],
                request_response::Config::default(),
            ),
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Connects the rogue to `target`, sends one request, and waits until the target hangs up.
async fn rogue_request_is_punished(target: &TestNode, request: RogueRequest) {
    let mut rogue = rogue_swarm();
    rogue.dial(target.addr.clone()).unwrap();
    let closed = tokio::time::timeout(SOON, async {
        loop {
            match rogue.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    rogue
                        .behaviour_mut()
                        .join
                        .send_request(&peer_id, Checked::Valid(request_placeholder(&request)));
                }
                SwarmEvent::ConnectionClosed {
                    num_established: 0, ..
                } => break,
                _ => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the target must disconnect a peer that sends a bad request"
    );
    // And it keeps running.
    assert!(target.net.status().await.is_ok());
}

fn request_placeholder(r: &RogueRequest) -> RogueRequest {
    match r {
        RogueRequest::Huge(v) => RogueRequest::Huge(v.clone()),
        _ => RogueRequest::Garbage(7),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_or_undecodable_requests_get_the_peer_disconnected() {
    // A pending node accepts anyone (it waits to be admitted), so the rogue gets through the gate.
    let target = start(
        identity::Keypair::generate_ed25519(),
        Membership::Pending,
        Invites::default(),
        vec![],
    );
    rogue_request_is_punished(&target, RogueRequest::Huge(vec![7; MAX_REQUEST_BYTES + 1])).await;
    let target = start(
        identity::Keypair::generate_ed25519(),
        Membership::Pending,
        Invites::default(),
        vec![],
    );
    rogue_request_is_punished(&target, RogueRequest::Garbage(7)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_is_redeemed_once_and_the_new_member_meets_the_others() {
    let (key, kps, roster) = mesh(&[Roles::default_member(), Roles::default_member()]);
    let a = member(kps[0].clone(), roster.clone(), Some(key), vec![]);
    let b = member(kps[1].clone(), roster, None, vec![a.addr.clone()]);
    eventually("A and B connected", || async {
        online(&a.net, b.peer).await.then_some(())
    })
    .await;
    let code = a
        .net
        .invite(
            Duration::from_secs(60),
            Roles::from(Role::Render),
            None,
            None,
        )
        .await
        .unwrap()
        .unwrap();
    let c = start(
        identity::Keypair::generate_ed25519(),
        Membership::Joining(code.clone()),
        Invites::default(),
        vec![],
    );
    // C joins and finds B through A.
    eventually("C online at B", || async {
        (online(&b.net, c.peer).await && online(&c.net, b.peer).await).then_some(())
    })
    .await;
    let c_status = c.net.status().await.unwrap();
    assert!(c_status.member);
    assert_eq!(c_status.roles, vec!["render".to_string()]);
    // A second peer with the same code is refused: it stays "joining".
    let d = start(
        identity::Keypair::generate_ed25519(),
        Membership::Joining(code),
        Invites::default(),
        vec![],
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(d.net.status().await.unwrap().state, "joining");
    assert!(
        !a.net
            .peers()
            .await
            .unwrap()
            .iter()
            .any(|p| p.peer_id == d.peer.to_string())
    );
}

/// A stand-in for the cloud's proof: an "AWS document" that is just the instance id, accepted
/// when it names the instance the invite is bound to.
fn naive_verifier() -> crate::IdentityVerifier {
    crate::IdentityVerifier(std::sync::Arc::new(|proof, required, _mesh, _now| {
        match (proof, &required.instance) {
            (IdentityProof::Aws { document, .. }, Some(wanted)) if document == wanted => Ok(()),
            (IdentityProof::Aws { document, .. }, _) => Err(format!("names {document}")),
            _ => Err("not an AWS proof".into()),
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_waits_for_its_invite_to_be_bound_and_only_the_named_one_joins() {
    let (key, kps, roster) = mesh(&[Roles::default_member()]);
    let a = start_with(
        kps[0].clone(),
        Membership::Member {
            roster,
            mesh_key: Some(key),
        },
        Invites::default(),
        vec![],
        None,
        Some(naive_verifier()),
    );
    let code = eventually("A listening", || async {
        a.net
            .invite(
                Duration::from_secs(60),
                Roles::from(Role::Render),
                None,
                Some(RequiredProof {
                    cloud: IdentityCloud::Aws,
                    instance: None,
                }),
            )
            .await
            .unwrap()
            .ok()
    })
    .await;
    let proof = |id: &str| {
        Some(IdentityProof::Aws {
            document: id.into(),
            signature: String::new(),
        })
    };
    // Before the launch call returned: the instance is told "not ready" and keeps asking.
    let c = start_with(
        identity::Keypair::generate_ed25519(),
        Membership::Joining(code.clone()),
        Invites::default(),
        vec![],
        proof("i-1"),
        None,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(c.net.status().await.unwrap().state, "joining");
    // Another instance holding the same token is refused for good once the invite is bound.
    a.net
        .bind_invite(
            code.token,
            RequiredProof {
                cloud: IdentityCloud::Aws,
                instance: Some("i-1".into()),
            },
        )
        .await
        .unwrap()
        .unwrap();
    let d = start_with(
        identity::Keypair::generate_ed25519(),
        Membership::Joining(code.clone()),
        Invites::default(),
        vec![],
        proof("i-2"),
        None,
    );
    eventually("C a member", || async {
        c.net.status().await.unwrap().member.then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(d.net.status().await.unwrap().state, "joining");
    // A spent invite cannot be bound again.
    assert!(
        a.net
            .bind_invite(
                code.token,
                RequiredProof {
                    cloud: IdentityCloud::Aws,
                    instance: Some("i-2".into()),
                },
            )
            .await
            .unwrap()
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_member_is_disconnected_everywhere() {
    let (key, kps, roster) = mesh(&[
        Roles::default_member(),
        Roles::default_member(),
        Roles::default_member(),
    ]);
    let a = member(kps[0].clone(), roster.clone(), Some(key), vec![]);
    let b = member(kps[1].clone(), roster.clone(), None, vec![a.addr.clone()]);
    let c = member(kps[2].clone(), roster, None, vec![a.addr.clone()]);
    eventually("B and C connected", || async {
        online(&b.net, c.peer).await.then_some(())
    })
    .await;
    a.net.revoke(c.peer).await.unwrap().unwrap();
    eventually("C gone at A and B", || async {
        let gone = |peers: Vec<PeerView>| !peers.iter().any(|p| p.peer_id == c.peer.to_string());
        (gone(a.net.peers().await.unwrap()) && gone(b.net.peers().await.unwrap())).then_some(())
    })
    .await;
    eventually("C sees nobody online", || async {
        let peers = c.net.peers().await.unwrap();
        (!peers.iter().any(|p| !p.is_self && p.online)).then_some(())
    })
    .await;
    assert!(online(&a.net, b.peer).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_lan_machine_is_admitted_by_fingerprint() {
    let (key, kps, roster) = mesh(&[Roles::default_member(), Roles::default_member()]);
    let a = member(kps[0].clone(), roster.clone(), Some(key), vec![]);
    let b = member(kps[1].clone(), roster, None, vec![a.addr.clone()]);
    let p = start(
        identity::Keypair::generate_ed25519(),
        Membership::Pending,
        Invites::default(),
        vec![],
    );
    eventually("A and B connected", || async {
        online(&a.net, b.peer).await.then_some(())
    })
    .await;
    // What mDNS would report on a LAN.
    for node in [&a, &b] {
        announce_on_lan(node, &p).await;
    }
    let pending = a.net.pending().await.unwrap();
    assert_eq!(pending.len(), 1);
    let fingerprint: blendnet_proto::Fingerprint = pending[0].fingerprint.parse().unwrap();
    assert_eq!(fingerprint, blendnet_proto::Fingerprint::of(&p.peer));
    // B does not hold the mesh key: it cannot admit.
    assert!(matches!(
        b.net.admit(fingerprint).await.unwrap(),
        Err(crate::AdmitError::NotAnIssuer)
    ));
    // A typo names nobody.
    let other = blendnet_proto::Fingerprint::of(&PeerId::random());
    assert!(matches!(
        a.net.admit(other).await.unwrap(),
        Err(crate::AdmitError::NoSuchPeer(_))
    ));
    assert_eq!(a.net.admit(fingerprint).await.unwrap().unwrap(), p.peer);
    let status = p.net.status().await.unwrap();
    assert!(status.member, "{status:?}");
    assert_eq!(status.mesh_id, a.net.status().await.unwrap().mesh_id);
    eventually("P online at B", || async {
        online(&b.net, p.peer).await.then_some(())
    })
    .await;
    assert!(a.net.pending().await.unwrap().is_empty());
    // Once a member, another mesh's owner cannot take it over: its gate refuses strangers.
    let (key2, kps2, roster2) = mesh(&[Roles::default_member()]);
    let x = member(kps2[0].clone(), roster2, Some(key2), vec![]);
    announce_on_lan(&x, &p).await;
    assert!(x.net.admit(fingerprint).await.unwrap().is_err());
    assert_eq!(
        p.net.status().await.unwrap().mesh_id,
        a.net.status().await.unwrap().mesh_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_certificate_expires_unless_renewed() {
    let (key, kps, roster) = mesh(&[Roles::default_member()]);
    let a = member(kps[0].clone(), roster, Some(key), vec![]);
    let lifetime = Duration::from_secs(3);
    let mut joined = Vec::new();
    for _ in 0..2 {
        let code = eventually("A listening", || async {
            a.net
                .invite(
                    Duration::from_secs(60),
                    Roles::from(Role::Render),
                    Some(lifetime),
                    None,
                )
                .await
                .unwrap()
                .ok()
        })
        .await;
        let node = start(
            identity::Keypair::generate_ed25519(),
            Membership::Joining(code),
            Invites::default(),
            vec![],
        );
        eventually("joined", || async {
            node.net.status().await.unwrap().member.then_some(())
        })
        .await;
        joined.push(node);
    }
    let (kept, dropped) = (&joined[0], &joined[1]);
    // `kept` is renewed every second; `dropped` is not.
    let listed = |peers: &[PeerView], p: PeerId| peers.iter().any(|v| v.peer_id == p.to_string());
    let until = tokio::time::Instant::now() + 2 * lifetime;
    while tokio::time::Instant::now() < until {
        a.net.renew(kept.peer, lifetime).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let peers = a.net.peers().await.unwrap();
    assert!(listed(&peers, kept.peer), "the renewed member dropped out");
    assert!(
        !listed(&peers, dropped.peer),
        "a certificate lasted past its lifetime"
    );
    // Nobody renews a peer that is no member any more.
    assert!(matches!(
        a.net.renew(dropped.peer, lifetime).await.unwrap(),
        Err(crate::RenewError::NotFound(_))
    ));
}
