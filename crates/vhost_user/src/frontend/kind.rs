//! What differs between the vhost-user devices the VMM fronts: the virtio device type, the
//! queues, which feature bits the driver may see, and the configuration space.

use virtio::{F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1};

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_FS: u32 = 26;

/// The size of virtio-blk's configuration space that the VMM asks a back-end for (virtio 1.2,
/// up to write_zeroes_may_unmap and its padding).
pub const BLK_CONFIG_LEN: usize = 60;
/// Where virtio-blk's num_queues sits in its configuration.
const BLK_CONFIG_NUM_QUEUES: usize = 34;
const BLK_F_MQ: u64 = 1 << 12;
/// The longest virtio-fs tag: the configuration's tag field.
pub const FS_TAG_LEN: usize = 36;

const NET_F_MAC: u64 = 1 << 5;
const NET_F_STATUS: u64 = 1 << 16;
/// What the VMM would have to serve itself on a control queue, or announce: not offered.
const NET_FRONTEND_ONLY: u64 = (1 << 17) | (1 << 18) | (1 << 19) | (1 << 20) | (1 << 21) | (1 << 22) | (1 << 23);
const NET_S_LINK_UP: u16 = 1;

/// Device-specific feature bits (0-23) and the ring features the VMM's transports handle; the
/// rest (packed rings, IOMMU platforms, notification data) they do not.
const TRANSPORT_FEATURES: u64 = F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_VERSION_1;
const DEVICE_FEATURES: u64 = (1 << 24) - 1;

/// The device a vhost-user socket serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Block,
    Fs { tag: String },
    Net { mac: [u8; 6] },
}

impl Kind {
    pub fn device_type(&self) -> u32 {
        match self {
            Kind::Block => TYPE_BLOCK,
            Kind::Fs { .. } => TYPE_FS,
            Kind::Net { .. } => TYPE_NET,
        }
    }

    /// The name in log lines and errors: vhost-user-blk, vhost-user-fs, vhost-user-net.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Block => "vhost-user-blk",
            Kind::Fs { .. } => "vhost-user-fs",
            Kind::Net { .. } => "vhost-user-net",
        }
    }

    /// Whether the back-end must give the configuration space (GET_CONFIG).
    pub fn config_from_backend(&self) -> bool {
        matches!(self, Kind::Block)
    }

    /// The queues for `requested` request queues (disk queues, fs request queues, net queue
    /// pairs), given the back-end's features and, for a disk, its configuration.
    pub fn queue_count(&self, requested: usize, backend_features: u64, config: &[u8]) -> usize {
        match self {
            Kind::Block if backend_features & BLK_F_MQ != 0 => {
                let offered = config
                    .get(BLK_CONFIG_NUM_QUEUES..BLK_CONFIG_NUM_QUEUES + 2)
                    .map_or(1, |b| u16::from_le_bytes([b[0], b[1]]));
                requested.min(usize::from(offered)).max(1)
            }
            Kind::Block => 1,
            // The high-priority queue, then the request queues.
            Kind::Fs { .. } => 1 + requested,
            // One receive and one transmit queue: more pairs need a control queue.
            Kind::Net { .. } => 2,
        }
    }

    /// The feature bits the driver is offered, from those the back-end offers.
    pub fn offered_features(&self, backend_features: u64) -> u64 {
        let common = backend_features & (DEVICE_FEATURES | TRANSPORT_FEATURES);
        match self {
            Kind::Block | Kind::Fs { .. } => common,
            Kind::Net { .. } => (common & !NET_FRONTEND_ONLY) | NET_F_MAC | NET_F_STATUS,
        }
    }

    /// The configuration space the driver reads: the back-end's (`from_backend`) with the
    /// queue count the VMM set up, or the VMM's own.
    pub fn config(&self, from_backend: Option<Vec<u8>>, queues: usize) -> Vec<u8> {
        match self {
            Kind::Block => {
                let mut config = from_backend.unwrap_or_default();
                config.resize(BLK_CONFIG_LEN, 0);
                let count = u16::try_from(queues).unwrap_or(u16::MAX).to_le_bytes();
                config[BLK_CONFIG_NUM_QUEUES..BLK_CONFIG_NUM_QUEUES + 2].copy_from_slice(&count);
                config
            }
            Kind::Fs { tag } => {
                let mut config = vec![0u8; FS_TAG_LEN + 4];
                let bytes = tag.as_bytes();
                config[..bytes.len().min(FS_TAG_LEN)].copy_from_slice(&bytes[..bytes.len().min(FS_TAG_LEN)]);
                let request_queues = u32::try_from(queues.saturating_sub(1)).unwrap_or(u32::MAX);
                config[FS_TAG_LEN..].copy_from_slice(&request_queues.to_le_bytes());
                config
            }
            Kind::Net { mac } => {
                let mut config = Vec::with_capacity(12);
                config.extend_from_slice(mac);
                config.extend_from_slice(&NET_S_LINK_UP.to_le_bytes());
                config.extend_from_slice(&1u16.to_le_bytes());
                config.extend_from_slice(&0u16.to_le_bytes());
                config
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_the_transports_cannot_serve_are_not_offered() {
        let packed = 1u64 << 34;
        let protocol = 1u64 << 30;
        let everything = u64::MAX;
        let blk = Kind::Block.offered_features(everything);
        assert_eq!(blk & (packed | protocol), 0);
        assert_eq!(blk & F_VERSION_1, F_VERSION_1);
        let net = Kind::Net { mac: [0; 6] }.offered_features(F_VERSION_1 | (1 << 17) | (1 << 22) | 1);
        assert_eq!(net, F_VERSION_1 | 1 | NET_F_MAC | NET_F_STATUS);
    }

    #[test]
    fn queue_counts_follow_the_back_end() {
        let mut config = vec![0u8; BLK_CONFIG_LEN];
        config[BLK_CONFIG_NUM_QUEUES] = 4;
        assert_eq!(Kind::Block.queue_count(8, BLK_F_MQ, &config), 4);
        assert_eq!(Kind::Block.queue_count(2, BLK_F_MQ, &config), 2);
        assert_eq!(Kind::Block.queue_count(8, 0, &config), 1);
        config[BLK_CONFIG_NUM_QUEUES] = 0;
        assert_eq!(Kind::Block.queue_count(8, BLK_F_MQ, &config), 1);
        assert_eq!(Kind::Fs { tag: "root".into() }.queue_count(1, 0, &[]), 2);
    }

    #[test]
    fn configs_are_laid_out_as_virtio_says() {
        let fs = Kind::Fs { tag: "myfs".into() }.config(None, 3);
        assert_eq!(&fs[..5], b"myfs\0");
        assert_eq!(&fs[FS_TAG_LEN..], &2u32.to_le_bytes());
        let blk = Kind::Block.config(Some(vec![1; 8]), 2);
        assert_eq!(blk.len(), BLK_CONFIG_LEN);
        assert_eq!(&blk[..8], &[1; 8]);
        assert_eq!(&blk[BLK_CONFIG_NUM_QUEUES..BLK_CONFIG_NUM_QUEUES + 2], &[2, 0]);
        let net = Kind::Net { mac: [2, 0, 0, 0, 0, 1] }.config(None, 2);
        assert_eq!(net, [2, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0]);
    }
}
