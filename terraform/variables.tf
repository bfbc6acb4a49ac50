variable "name" {
  description = "Name of the deployment; prefixes every resource (lower case letters, digits and dashes)."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,20}$", var.name))
    error_message = "name is 3-21 characters: a lower case letter, then lower case letters, digits or dashes."
  }
}

variable "environment" {
  description = "Environment the deployment belongs to (dev or prod); tags every resource."
  type        = string

  validation {
    condition     = contains(["dev", "prod"], var.environment)
    error_message = "environment is dev or prod."
  }
}

variable "azs" {
  description = "Three availability zones of the region: one public and one private subnet and one NAT gateway in each."
  type        = list(string)

  validation {
    condition     = length(var.azs) == 3
    error_message = "give exactly three availability zones."
  }
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC (a /16 is split into /20 subnets)."
  type        = string
  default     = "10.0.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && tonumber(split("/", var.vpc_cidr)[1]) <= 16
    error_message = "vpc_cidr is a valid IPv4 CIDR block of /16 or larger."
  }
}

variable "eks_version" {
  description = "Kubernetes version of the EKS control plane (the manifests in cluster/ are validated against it)."
  type        = string
  default     = "1.32"

  validation {
    condition     = can(regex("^1\\.(2[89]|3[0-9])$", var.eks_version))
    error_message = "eks_version is 1.28 or later, as MAJOR.MINOR."
  }
}

variable "admin_cidrs" {
  description = "CIDR blocks (VPN, bastion) allowed to reach the private EKS API endpoint from inside the VPC."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.admin_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "admin_cidrs are valid CIDR blocks and never 0.0.0.0/0."
  }
}

variable "on_demand_nodes" {
  description = "On-demand node group (Ray heads, API, the coordinator): instance types and min/desired/max size."
  type = object({
    instance_types = list(string)
    min_size       = number
    desired_size   = number
    max_size       = number
  })
  default = { instance_types = ["m7i.xlarge"], min_size = 3, desired_size = 3, max_size = 6 }

  validation {
    condition     = var.on_demand_nodes.min_size >= 1 && var.on_demand_nodes.min_size <= var.on_demand_nodes.desired_size && var.on_demand_nodes.desired_size <= var.on_demand_nodes.max_size
    error_message = "on_demand_nodes needs 1 <= min_size <= desired_size <= max_size."
  }
}

variable "spot_nodes" {
  description = "Spot node group (PartitionWorkers, backfills; the autoscaler adds and removes them): instance types and sizes."
  type = object({
    instance_types = list(string)
    min_size       = number
    desired_size   = number
    max_size       = number
  })
  default = { instance_types = ["m7i.2xlarge", "m6i.2xlarge", "m7a.2xlarge"], min_size = 0, desired_size = 2, max_size = 20 }

  validation {
    condition     = var.spot_nodes.min_size >= 0 && var.spot_nodes.min_size <= var.spot_nodes.desired_size && var.spot_nodes.desired_size <= var.spot_nodes.max_size
    error_message = "spot_nodes needs 0 <= min_size <= desired_size <= max_size."
  }
}

variable "msk_instance_type" {
  description = "Broker instance type of the MSK cluster (one broker per availability zone)."
  type        = string
  default     = "kafka.m7g.large"

  validation {
    condition     = startswith(var.msk_instance_type, "kafka.")
    error_message = "msk_instance_type is an MSK broker type (kafka.*)."
  }
}

variable "msk_kafka_version" {
  description = "Apache Kafka version of the MSK cluster."
  type        = string
  default     = "3.8.x"
}

variable "msk_volume_gb" {
  description = "EBS volume per broker, in GiB."
  type        = number
  default     = 500

  validation {
    condition     = var.msk_volume_gb >= 100 && var.msk_volume_gb <= 16384
    error_message = "msk_volume_gb is between 100 and 16384."
  }
}

variable "rds_instance_class" {
  description = "Instance class of the PostgreSQL database (closed windows, schema registry, audit)."
  type        = string
  default     = "db.m7g.large"

  validation {
    condition     = startswith(var.rds_instance_class, "db.")
    error_message = "rds_instance_class is an RDS class (db.*)."
  }
}

variable "rds_allocated_storage_gb" {
  description = "Initial storage of the database in GiB (it grows to four times this on its own)."
  type        = number
  default     = 100

  validation {
    condition     = var.rds_allocated_storage_gb >= 20
    error_message = "rds_allocated_storage_gb is at least 20."
  }
}

variable "rds_backup_retention_days" {
  description = "Days of automated database backups."
  type        = number
  default     = 14

  validation {
    condition     = var.rds_backup_retention_days >= 7 && var.rds_backup_retention_days <= 35
    error_message = "rds_backup_retention_days is between 7 and 35."
  }
}

variable "redis_node_type" {
  description = "Node type of the ElastiCache Redis replication group (sinks, live updates, rate limits, GCS fault tolerance)."
  type        = string
  default     = "cache.m7g.large"

  validation {
    condition     = startswith(var.redis_node_type, "cache.")
    error_message = "redis_node_type is an ElastiCache node type (cache.*)."
  }
}

variable "checkpoint_noncurrent_days" {
  description = "Days a replaced checkpoint or window file version is kept before it expires."
  type        = number
  default     = 30

  validation {
    condition     = var.checkpoint_noncurrent_days >= 1
    error_message = "checkpoint_noncurrent_days is at least 1."
  }
}

variable "log_retention_days" {
  description = "Retention of every CloudWatch log group (flow logs, EKS control plane, MSK)."
  type        = number
  default     = 365

  validation {
    condition     = contains([365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days is one CloudWatch accepts and at least a year."
  }
}

variable "alarm_emails" {
  description = "Addresses subscribed to the alarm topic (confirm by mail)."
  type        = list(string)
  default     = []
}

variable "kuberay_chart_version" {
  description = "Version of the kuberay-operator Helm chart (the CRDs in cluster/ are validated against this release)."
  type        = string
  default     = "1.7.0"
}

variable "raystream_namespace" {
  description = "Kubernetes namespace the raystream ServiceAccount lives in (its IRSA role trusts only it)."
  type        = string
  default     = "raystream"
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
