# One security group per tier. The stores take connections from the EKS nodes only, on their own port;
# the nodes talk to each other (Ray picks ports) and out through the NAT gateways.

resource "aws_security_group" "nodes" {
  name        = "${var.name}-nodes"
  description = "EKS nodes: Ray pods (heads, workers, Serve replicas)"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-nodes" })
}

resource "aws_vpc_security_group_ingress_rule" "nodes_from_nodes" {
  security_group_id            = aws_security_group.nodes.id
  referenced_security_group_id = aws_security_group.nodes.id
  ip_protocol                  = "-1"
  description                  = "node to node: Ray's GCS, raylets, object manager, workers, Serve"
  tags                         = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "nodes_from_control_plane" {
  for_each = { webhooks = 443, kubelet = 10250 }

  security_group_id            = aws_security_group.nodes.id
  referenced_security_group_id = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  description                  = "EKS control plane to the ${each.key}"
  tags                         = local.tags
}

resource "aws_vpc_security_group_egress_rule" "nodes_out" {
  security_group_id = aws_security_group.nodes.id
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
  description       = "nodes reach AWS APIs, the identity provider and image registries through the NAT gateways"
  tags              = local.tags
}

resource "aws_security_group" "msk" {
  name        = "${var.name}-msk"
  description = "MSK brokers: TLS with IAM auth from the nodes"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-msk" })
}

resource "aws_vpc_security_group_ingress_rule" "msk_from_nodes" {
  security_group_id            = aws_security_group.msk.id
  referenced_security_group_id = aws_security_group.nodes.id
  ip_protocol                  = "tcp"
  from_port                    = 9098
  to_port                      = 9098
  description                  = "Kafka over TLS with IAM auth"
  tags                         = local.tags
}

resource "aws_security_group" "rds" {
  name        = "${var.name}-rds"
  description = "PostgreSQL from the nodes"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-rds" })
}

resource "aws_vpc_security_group_ingress_rule" "rds_from_nodes" {
  security_group_id            = aws_security_group.rds.id
  referenced_security_group_id = aws_security_group.nodes.id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
  description                  = "PostgreSQL"
  tags                         = local.tags
}

resource "aws_security_group" "redis" {
  name        = "${var.name}-redis"
  description = "Redis (TLS, AUTH) from the nodes"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-redis" })
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_nodes" {
  security_group_id            = aws_security_group.redis.id
  referenced_security_group_id = aws_security_group.nodes.id
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
  description                  = "Redis over TLS"
  tags                         = local.tags
}

resource "aws_security_group" "eks_api" {
  name        = "${var.name}-eks-api"
  description = "The private EKS API endpoint: from the nodes and the admin CIDRs"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-eks-api" })
}

resource "aws_vpc_security_group_ingress_rule" "eks_api_from_nodes" {
  security_group_id            = aws_security_group.eks_api.id
  referenced_security_group_id = aws_security_group.nodes.id
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  description                  = "kubelets, the KubeRay operator and the Ray autoscaler"
  tags                         = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "eks_api_from_admins" {
  for_each          = toset(var.admin_cidrs)
  security_group_id = aws_security_group.eks_api.id
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  description       = "operators (VPN, bastion)"
  tags              = local.tags
}
